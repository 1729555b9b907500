"""``python -m dit_accel.comfyui install /path/to/ComfyUI``: the one install step of the node pack.

It writes ``custom_nodes/dit_accel/__init__.py`` into that ComfyUI folder: a file that only imports the nodes
from the installed ``dit_accel`` package (install dit_accel into ComfyUI's Python environment first), so
upgrading dit_accel upgrades the nodes and nothing is copied.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from ..atomic_files import atomic_write_text

__all__ = ["SHIM", "install", "main", "other_python"]

MARKER = "# Written by `python -m dit_accel.comfyui install`"
SHIM = f'''{MARKER}: ComfyUI loads dit_accel's nodes from the installed dit_accel
# package (pip install dit-accel into ComfyUI's Python environment). Run the command again to rewrite this file.
try:
    from dit_accel.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as err:
    if err.name not in ("dit_accel", "dit_accel.comfyui"):
        raise
    import sys

    raise ImportError(f"the dit_accel nodes need the dit_accel package in the Python that runs ComfyUI "
                      f"({{sys.executable}}), which has none (or one without them): install it there "
                      f"({{sys.executable}} -m pip install dit-accel, or -e /path/to/dit_accel) and restart ComfyUI"
                      ) from None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def install(comfyui: Path) -> Path:
    """Write the shim into ``comfyui``'s ``custom_nodes``; the file written. ValueError (one line) for a folder
    that is not ComfyUI, a ``custom_nodes/dit_accel/__init__.py`` this command did not write, or a folder it cannot
    write into (left as it was)."""
    root = Path(comfyui).expanduser()
    if not _is_comfyui(root):
        near = [p for p in (root.parent, root / "ComfyUI") if _is_comfyui(p)]  # custom_nodes/; the portable's
        hint = f" ({near[0]}, it seems)" if near else ""
        raise ValueError(f"{root} is not a ComfyUI folder (it has no comfy/ and custom_nodes/ folders): give the "
                         f"folder of ComfyUI's main.py{hint}")
    target = root / "custom_nodes" / "dit_accel" / "__init__.py"
    _check_not_a_link(target.parent)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise ValueError(f"{target} exists and is not a file this command wrote: move the folder {target.parent} "
                         "away first (it is another node pack named dit_accel)")
    if target.exists() and not target.read_text(encoding="utf-8", errors="replace").startswith(MARKER):
        raise ValueError(f"{target} exists and was not written by this command: move that folder away first (it "
                         "is another node pack named dit_accel)")
    _check_folder(target.parent)
    created = not target.parent.exists()
    try:
        target.parent.mkdir(exist_ok=True)
        return atomic_write_text(target, SHIM)
    except OSError as err:
        if created:  # an empty custom_nodes/dit_accel left behind: ComfyUI logs it as a node pack that failed
            shutil.rmtree(target.parent, ignore_errors=True)
        raise ValueError(f"cannot write {target} ({err.strerror or err}): run the command as a user who may write "
                         f"into {root / 'custom_nodes'}; nothing was changed") from None


def _is_comfyui(root: Path) -> bool:
    return (root / "custom_nodes").is_dir() and (root / "comfy").is_dir()


def _check_not_a_link(folder: Path) -> None:
    """A ``custom_nodes/dit_accel`` that is a link (a clone linked in, or one left dangling) is not written through:
    the shim would land in the linked folder, or fail as "File exists" (said as a permission problem)."""
    if folder.is_symlink():
        where = os.readlink(folder)
        state = "" if folder.exists() else ", which does not exist"
        raise ValueError(f"{folder} is a link to {where}{state}: remove the link (it is not this command's), then run "
                         "the command again")


def other_python(root: Path) -> Optional[Path]:
    """The Python of ComfyUI's own environment where one is beside it and is not this one (the Windows portable's
    ``python_embeded``, a ``venv`` or ``.venv`` in the ComfyUI folder): the shim imports dit_accel from ComfyUI's
    Python, so dit_accel installed into this one alone leaves the nodes unloaded. None where there is none."""
    here = Path(sys.prefix).resolve()
    for env in (root.parent / "python_embeded", root / "venv", root / ".venv"):
        python = next((p for p in (env / "python.exe", env / "bin" / "python", env / "Scripts" / "python.exe")
                       if p.is_file()), None)
        if python is not None and env.resolve() != here:
            return python
    return None


def _check_folder(folder: Path) -> None:
    """A ``custom_nodes/dit_accel`` without the shim is the command's only when it holds nothing else (ComfyUI's
    ``__pycache__`` of an earlier shim aside): else it is someone's (a clone of a repository), not written into."""
    if not folder.exists() or (folder / "__init__.py").exists():
        return
    if not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder: move it away first")
    other = sorted(p.name for p in folder.iterdir() if p.name != "__pycache__")
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise ValueError(f"{folder} exists and holds files this command did not write ({shown}): move that folder "
                         "away first (it is another node pack, or a clone, named dit_accel)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit_accel.comfyui",
                                     description="Install dit_accel's ComfyUI nodes (docs/comfyui.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("install", help="write custom_nodes/dit_accel/__init__.py into a ComfyUI folder")
    cmd.add_argument("comfyui", type=Path, help="the ComfyUI folder (where main.py is)")
    args = parser.parse_args(argv)
    try:
        written = install(args.comfyui)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}: restart ComfyUI and the dit_accel nodes are under the dit_accel category")
    python = other_python(Path(args.comfyui).expanduser())
    if python is not None:
        print(f"note: ComfyUI there has its own Python ({python}), not this one ({sys.executable}): the nodes load "
              f"only where dit_accel is installed into it: {python} -m pip install dit-accel (or -e "
              "/path/to/dit_accel)", file=sys.stderr)
    return 0
