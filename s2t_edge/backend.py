"""llama.cpp process-wide setup: the backend, its log (errors kept for our own messages), threads."""

from __future__ import annotations

import ctypes
import os
import sys

import llama_cpp

MAX_THREADS = 512  # GGML_MAX_N_THREADS: more crashes llama.cpp's thread pool (a segfault, not an error)

_backend_ready = False
last_error = [""]  # llama.cpp's last ERROR-level line, quoted in our own messages


@llama_cpp.llama_log_callback
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Drop llama.cpp's chatter; errors reach the user through our own messages."""
    if level == 4:  # GGML_LOG_LEVEL_ERROR
        last_error[0] = text.decode("utf-8", "replace").strip()
    if os.environ.get("S2T_EDGE_LLAMA_LOG"):
        print(text.decode("utf-8", "replace"), end="", file=sys.stderr)


def init_backend() -> None:
    """Once per process: route llama.cpp's log through `_quiet_log`, then start its backend."""
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _backend_ready = True


def default_threads() -> int:
    """All available cores (capped at 8): decode on a laptop is memory-bound past that."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        n = os.cpu_count() or 1
    return max(1, min(n, 8))
