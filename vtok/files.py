"""File modes: every file vtok writes is as readable as the process umask allows.

``open()`` creates files with mode ``0o666 & ~umask`` (0644 under the usual umask 022), but some
writers do not: safetensors creates its files 0600 whatever the umask, so on a shared cluster nobody
else could read a checkpoint or an exported model. Every writer that does not go through ``open()``
(safetensors files, whole checkpoint directories) calls :func:`respect_umask` on what it wrote before
renaming it into place.
"""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _lock:  # elsewhere: set and restore it (briefly process-wide)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def respect_umask(*paths: str | Path) -> None:
    """Give each regular file in ``paths`` the mode a plain ``open()`` would have (0o666 & ~umask);
    a directory is walked recursively (its files only; directories come from ``mkdir`` already)."""
    mode = file_mode()
    for path in map(Path, paths):
        files = path.rglob("*") if path.is_dir() else (path,)
        for file in files:
            st = file.lstat()
            if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                os.chmod(file, mode)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically (a ``.tmp`` sibling renamed into place),
    with the umask's mode instead of safetensors' 0600."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    respect_umask(tmp)
    os.replace(tmp, path)
    return path


__all__ = ["current_umask", "file_mode", "respect_umask", "save_safetensors"]
