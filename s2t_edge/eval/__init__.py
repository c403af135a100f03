"""Model-independent offline evaluation: data loading, grading, voting, results, comparison."""
