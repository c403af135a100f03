"""`python -m s2t_edge.cli`: the same as the `s2t-edge` command."""

from s2t_edge.cli import main

main()
