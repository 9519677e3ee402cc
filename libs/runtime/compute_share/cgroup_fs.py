"""Where the cgroup `cpu` controller lives and how its files are read and written.

cgroup v1 mounts one hierarchy per controller set (`cgroup ... rw,cpu` or `rw,cpu,cpuacct`);
cgroup v2 mounts one unified hierarchy (`cgroup2`) whose root lists its controllers in
`cgroup.controllers`. A machine may have both (hybrid): the `cpu` controller then belongs to
whichever hierarchy has it, and a v1 `cpu` mount wins because the kernel binds a controller to
one hierarchy only.

`CgroupFs` is the kernel's filesystem seen through four operations; tests swap in a subclass
that imitates what the kernel does on mkdir and rmdir (control files appear and vanish).
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

CgroupVersion = Literal[1, 2]


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """The hierarchy holding the `cpu` controller: its version and where it is mounted."""

    version: CgroupVersion
    path: Path


class MountEntry(NamedTuple):
    mount_point: Path
    fs_type: str
    options: frozenset[str]  # superblock options: for cgroup v1, the controllers


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Mount tables write space, tab, newline and backslash as \\040, \\011, \\012, \\134."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Entries of /proc/<pid>/mountinfo: `id parent dev root mount_point opts [tags] - fstype
    source super_opts`."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        options = frozenset(tail[2].split(","))
        entries.append(MountEntry(Path(_unescape(fields[4])), tail[0], options))
    return entries


def parse_mounts(text: str) -> list[MountEntry]:
    """Entries of /proc/mounts: `source mount_point fstype options dump pass`."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            options = frozenset(fields[3].split(","))
            entries.append(MountEntry(Path(_unescape(fields[1])), fields[2], options))
    return entries


def find_cpu_cgroup(
    entries: list[MountEntry], controllers_of: Callable[[Path], str]
) -> CgroupMount | None:
    """The v1 hierarchy with `cpu` if one is mounted, else a v2 hierarchy whose root offers
    `cpu` (`controllers_of(mount)` returns its cgroup.controllers), else None."""
    for entry in entries:
        if entry.fs_type == "cgroup" and "cpu" in entry.options:
            return CgroupMount(1, entry.mount_point)
    for entry in entries:
        if entry.fs_type == "cgroup2" and "cpu" in controllers_of(entry.mount_point).split():
            return CgroupMount(2, entry.mount_point)
    return None


def read_controllers(mount: Path) -> str:
    try:
        return (mount / "cgroup.controllers").read_text()
    except OSError:
        return ""


def detect_cpu_cgroup(proc_root: Path = Path("/proc")) -> CgroupMount | None:
    """The cpu controller's hierarchy on this machine, from mountinfo (or /proc/mounts)."""
    try:
        entries = parse_mountinfo((proc_root / "self" / "mountinfo").read_text())
    except OSError:
        try:
            entries = parse_mounts((proc_root / "mounts").read_text())
        except OSError:
            return None
    return find_cpu_cgroup(entries, read_controllers)


def cgroup_writable(mount: CgroupMount) -> bool:
    """Whether this process may create cgroups there (and, on v2, enable controllers)."""
    if not os.access(mount.path, os.W_OK):
        return False
    return mount.version == 1 or os.access(mount.path / "cgroup.subtree_control", os.W_OK)


def cgroup_of(proc_cgroup: str, version: CgroupVersion) -> str:
    """A process's cgroup path (relative to the hierarchy's mount) from /proc/<pid>/cgroup,
    whose lines read `id:controllers:path` (v2: `0::path`)."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if version == 2 and hierarchy == "0" and controllers == "":
            return path
        if version == 1 and "cpu" in controllers.split(","):
            return path
    raise FileNotFoundError(f"no cgroup v{version} cpu entry in {proc_cgroup!r}")


class CgroupFs:
    """The kernel's cgroup filesystem: a cgroup is a directory, its settings are files."""

    def make(self, path: Path) -> None:
        """Create the cgroup `path` (the kernel fills in its control files)."""
        path.mkdir(exist_ok=True)

    def write(self, path: Path, text: str) -> None:
        """One write() of `text` to a control file, as the kernel expects."""
        with open(path, "w") as control:
            control.write(text)

    def read(self, path: Path) -> str:
        return path.read_text()

    def remove(self, path: Path) -> None:
        """Remove the cgroup `path`; fails while it has processes or child cgroups."""
        os.rmdir(path)
