"""The cpu-cgroup backend against a temporary directory that imitates cgroup v1 and v2, the
mount-table parsing that finds the cpu controller, and one test on the machine's real cgroup
when it is writable."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from duetserve.runtime.compute_share.base import ComputeShareError, InvalidShareError
from duetserve.runtime.compute_share.cgroup import (
    LATENCY_PERIOD_US,
    CgroupCpuShare,
    CpuQuota,
    read_quota,
    weight_file,
)
from duetserve.runtime.compute_share.cgroup_fs import (
    CgroupFs,
    CgroupMount,
    CgroupVersion,
    cgroup_of,
    cgroup_writable,
    detect_cpu_cgroup,
    find_cpu_cgroup,
    parse_mountinfo,
    parse_mounts,
)

PID = 4242
OTHER_TID = 4243


class ImitationCgroupFs(CgroupFs):
    """What the kernel does in a cgroup filesystem, on plain directories: mkdir fills in the
    control files (v2: cpu.max only once the parent enabled +cpu), a pid written to cgroup.procs
    leaves every other cgroup, rmdir refuses a cgroup with processes or children and takes its
    control files with it, and a control file that does not exist cannot be written."""

    def __init__(self, root: Path, version: CgroupVersion) -> None:
        self.root = root
        self.version = version
        self.writes: list[tuple[Path, str]] = []

    def make(self, path: Path) -> None:
        path.mkdir(exist_ok=True)
        files = {"cgroup.procs": ""}
        if self.version == 1:
            files |= {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"}
            files["cpu.shares"] = "1024\n"
        else:
            files["cgroup.subtree_control"] = ""
            if "cpu" in (path.parent / "cgroup.subtree_control").read_text():
                files |= {"cpu.max": "max 100000\n", "cpu.weight": "100\n"}
        for name, text in files.items():
            if not (path / name).exists():
                (path / name).write_text(text)

    def write(self, path: Path, text: str) -> None:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "no such control file", str(path))
        self.writes.append((path, text))
        if path.name == "cgroup.procs":
            for procs in self.root.rglob("cgroup.procs"):
                kept = [line for line in procs.read_text().split() if line != text]
                procs.write_text("".join(f"{line}\n" for line in kept))
            with open(path, "a") as procs_file:
                procs_file.write(f"{text}\n")
        elif path.name == "cgroup.subtree_control":
            controllers = set(path.read_text().split()) | {text.removeprefix("+")}
            path.write_text(" ".join(sorted(controllers)))
        else:
            super().write(path, text)

    def remove(self, path: Path) -> None:
        if any(child.is_dir() for child in path.iterdir()):
            raise OSError(errno.EBUSY, "cgroup has children", str(path))
        if (path / "cgroup.procs").read_text().strip():
            raise OSError(errno.EBUSY, "cgroup has processes", str(path))
        for control in path.iterdir():
            control.unlink()
        path.rmdir()


class Recorder:
    def __init__(self, original: set[int]) -> None:
        self.original = original
        self.affinity: dict[int, set[int]] = {}
        self.threads: list[int] = []

    def set_affinity(self, tid: int, cores: object) -> None:
        self.affinity[tid] = set(cores)  # type: ignore[call-overload]

    def get_affinity(self, pid: int) -> set[int]:
        return set(self.original)


def make_machine(tmp_path: Path, version: CgroupVersion, home: str = "/") -> tuple[Path, Path]:
    """A cgroup root holding PID in cgroup `home`, and a /proc that lists PID's two threads."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.procs").write_text("1\n")
    if version == 2:
        (root / "cgroup.subtree_control").write_text("")
    home_dir = root / home.lstrip("/")
    home_dir.mkdir(parents=True, exist_ok=True)
    with open(home_dir / "cgroup.procs", "a") as procs:
        procs.write(f"{PID}\n")
    proc = tmp_path / "proc"
    for tid in (PID, OTHER_TID):
        (proc / str(PID) / "task" / str(tid)).mkdir(parents=True)
    entry = f"4:cpu,cpuacct:{home}\n" if version == 1 else f"0::{home}\n"
    (proc / str(PID) / "cgroup").write_text(f"9:pids:/\n{entry}")
    return root, proc


def open_share(
    root: Path, proc: Path, version: CgroupVersion, role: str, recorder: Recorder, **kw: object
) -> CgroupCpuShare:
    return CgroupCpuShare(
        CgroupMount(version, root),
        "unit0",
        role,  # type: ignore[arg-type]
        [0, 1],
        pid=PID,
        fs=ImitationCgroupFs(root, version),
        proc_root=proc,
        set_affinity=recorder.set_affinity,
        get_affinity=recorder.get_affinity,
        set_threads=recorder.threads.append,
        **kw,  # type: ignore[arg-type]
    )


def procs_of(path: Path) -> list[str]:
    return (path / "cgroup.procs").read_text().split()


def test_v1_quota_is_written_changed_in_place_and_cleaned_up(tmp_path: Path) -> None:
    root, proc = make_machine(tmp_path, 1)
    recorder = Recorder(original={0, 1, 2, 3})
    share = open_share(root, proc, 1, "prefill", recorder, limit="quota")
    assert share.path == root / "duet" / "unit0" / "prefill"
    assert procs_of(share.path) == [str(PID)] and str(PID) not in procs_of(root)
    assert recorder.affinity == {PID: {0, 1}, OTHER_TID: {0, 1}}  # every thread, unit cores

    applied = share.apply(0.75)
    assert read_quota(CgroupFs(), share.path, 1) == CpuQuota(150_000, 100_000)
    assert (share.path / "cpu.shares").read_text() == "1024\n"  # a quota, not a weight
    assert (applied.given, applied.amount, applied.unit) == (0.75, 2, "threads")
    assert share.apply(0.3).given == pytest.approx(0.3)
    assert read_quota(CgroupFs(), share.path, 1) == CpuQuota(60_000, 100_000)
    assert recorder.threads == [2, 1]

    share.close()
    assert procs_of(root) == ["1", str(PID)]
    assert not (root / "duet").exists()
    assert recorder.affinity == {PID: {0, 1, 2, 3}, OTHER_TID: {0, 1, 2, 3}}
    writes = len(share._fs.writes)  # type: ignore[attr-defined]
    share.close()  # safe twice: nothing more is written
    assert len(share._fs.writes) == writes  # type: ignore[attr-defined]
    with pytest.raises(InvalidShareError, match="after close"):
        share.apply(0.5)


def test_v2_enables_cpu_down_the_tree_and_returns_to_a_nested_home(tmp_path: Path) -> None:
    root, proc = make_machine(tmp_path, 2, home="/user.slice/session-1.scope")
    recorder = Recorder(original={0, 1})
    share = open_share(
        root, proc, 2, "decode", recorder, period_us=LATENCY_PERIOD_US, limit="quota"
    )
    for level in (root, root / "duet", root / "duet" / "unit0"):
        assert "cpu" in (level / "cgroup.subtree_control").read_text().split()
    applied = share.apply(0.4)
    assert (share.path / "cpu.max").read_text() == "16000 20000"
    assert read_quota(CgroupFs(), share.path, 2) == CpuQuota(16_000, 20_000)
    assert applied.given == pytest.approx(0.4)
    share.close()
    assert procs_of(root / "user.slice" / "session-1.scope") == [str(PID)]
    assert not (root / "duet").exists()


@pytest.mark.parametrize(
    ("version", "control", "weights"),
    [(1, "cpu.shares", ("1536", "614", "2")), (2, "cpu.weight", ("150", "60", "1"))],
)
def test_a_weight_is_work_conserving_a_share_under_contention_only(
    tmp_path: Path, version: CgroupVersion, control: str, weights: tuple[str, str, str]
) -> None:
    """The default: a CPU weight, the quota lifted, and a torch thread per unit core, so that a
    worker runs on the whole unit while the other is idle."""
    root, proc = make_machine(tmp_path, version)
    recorder = Recorder(original={0, 1})
    share = open_share(root, proc, version, "prefill", recorder)
    share.apply(0.4 if version == 1 else 0.9)  # a quota first: apply lifts it
    for requested, weight in zip((0.75, 0.3, 0.0001), weights, strict=True):
        applied = share.apply(requested)
        assert (share.path / control).read_text() == weight
        assert read_quota(CgroupFs(), share.path, version).quota_us is None
        assert (applied.given, applied.amount) == (requested, 2)
        assert "while the other is idle" in applied.description
    assert recorder.threads == [2, 2, 2, 2]
    share.close()
    assert not (root / "duet").exists()


@pytest.mark.parametrize(
    ("version", "control", "thread"), [(1, "cpu.shares", 1024), (2, "cpu.weight", 100)]
)
def test_the_unit_weighs_as_many_threads_as_it_has_cores(
    tmp_path: Path, version: CgroupVersion, control: str, thread: int
) -> None:
    """At the kernel's default weight, the unit's cgroup (two workers, a thread per core each)
    weighed as much as one thread of any other process: each front-end thread that woke took
    half a core from the model. The unit weighs its 2 cores; `duet`, holding every unit, the
    machine's 4."""
    root, proc = make_machine(tmp_path, version)
    recorder = Recorder(original={0, 1})
    share = open_share(root, proc, version, "decode", recorder, machine_cores=4)
    share.apply(0.25)
    assert (root / "duet" / "unit0" / control).read_text() == str(2 * thread)
    assert (root / "duet" / control).read_text() == str(4 * thread)
    share.close()


def test_an_unknown_limit_is_refused(tmp_path: Path) -> None:
    root, proc = make_machine(tmp_path, 1)
    with pytest.raises(InvalidShareError, match="weight or quota"):
        open_share(root, proc, 1, "prefill", Recorder({0, 1}), limit="cap")


def test_closing_one_worker_keeps_the_other_workers_cgroup(tmp_path: Path) -> None:
    root, proc = make_machine(tmp_path, 1)
    prefill = open_share(root, proc, 1, "prefill", Recorder({0, 1}))
    decode_root = root / "duet" / "unit0" / "decode"
    ImitationCgroupFs(root, 1).make(decode_root)  # the decode worker's cgroup, process inside
    (decode_root / "cgroup.procs").write_text("5151\n")
    prefill.close()
    assert not prefill.path.exists()
    assert decode_root.exists() and procs_of(decode_root) == ["5151"]


def test_a_small_share_on_a_short_period_reports_the_minimum_quota(tmp_path: Path) -> None:
    root, proc = make_machine(tmp_path, 1)
    share = open_share(
        root, proc, 1, "decode", Recorder({0, 1}), period_us=LATENCY_PERIOD_US, limit="quota"
    )
    applied = share.apply(0.01)  # 400 us asked, the kernel's minimum is 1000 us
    assert read_quota(CgroupFs(), share.path, 1) == CpuQuota(1_000, 20_000)
    assert applied.given == pytest.approx(0.025)
    share.close()


def test_refuses_a_unit_name_that_is_not_a_plain_name(tmp_path: Path) -> None:
    root, proc = make_machine(tmp_path, 1)
    with pytest.raises(InvalidShareError, match="unit name"):
        CgroupCpuShare(CgroupMount(1, root), "../etc", "prefill", [0], pid=PID, proc_root=proc)


def test_a_missing_hierarchy_is_a_clear_error(tmp_path: Path) -> None:
    _, proc = make_machine(tmp_path, 1)
    gone = CgroupMount(1, tmp_path / "not-mounted")
    with pytest.raises(ComputeShareError, match="cpu-cgroup: cannot create"):
        open_share(gone.path, proc, 1, "prefill", Recorder({0}))


THIS_MACHINE = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_ONLY = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_finds_the_v1_cpu_controller_before_a_hybrid_v2() -> None:
    found = find_cpu_cgroup(parse_mountinfo(THIS_MACHINE), lambda _: "cpu memory")
    assert found == CgroupMount(1, Path("/sys/fs/cgroup/cpu"))


def test_finds_v2_only_when_its_root_offers_cpu() -> None:
    entries = parse_mountinfo(V2_ONLY)
    assert find_cpu_cgroup(entries, lambda _: "cpuset cpu io memory pids") == CgroupMount(
        2, Path("/sys/fs/cgroup")
    )
    assert find_cpu_cgroup(entries, lambda _: "memory pids") is None
    hybrid_without_cpu = parse_mountinfo(THIS_MACHINE.replace("rw,cpu\n", "rw,freezer\n"))
    assert find_cpu_cgroup(hybrid_without_cpu, lambda _: "") is None


def test_parses_proc_mounts_and_escaped_mount_points() -> None:
    mounts = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n"
    found = find_cpu_cgroup(parse_mounts(mounts), lambda _: "")
    assert found == CgroupMount(1, Path("/sys/fs/cgroup/cpu,cpuacct"))
    spaced = "40 31 0:38 / /mnt/my\\040cgroup rw - cgroup cgroup rw,cpu\n"
    assert parse_mountinfo(spaced)[0].mount_point == Path("/mnt/my cgroup")


def test_reads_a_process_cgroup_for_either_version() -> None:
    text = "12:pids:/a\n4:cpu,cpuacct:/duet/u/prefill\n0::/user.slice\n"
    assert cgroup_of(text, 1) == "/duet/u/prefill"
    assert cgroup_of(text, 2) == "/user.slice"
    with pytest.raises(FileNotFoundError):
        cgroup_of("12:pids:/a\n", 1)


@pytest.mark.parametrize("limit", ["quota", "weight"])
def test_real_cgroup_share_on_a_sleeping_child(limit: str) -> None:
    mount = detect_cpu_cgroup()
    if mount is None or not cgroup_writable(mount):
        pytest.skip(
            "needs a writable cgroup hierarchy with the cpu controller (root, no container)"
        )
    cores = sorted(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    unit = f"test-{os.getpid()}"
    try:
        home = cgroup_of(Path(f"/proc/{child.pid}/cgroup").read_text(), mount.version)
        share = CgroupCpuShare(
            mount,
            unit,
            "decode",
            cores,
            pid=child.pid,
            set_threads=None,
            limit=limit,  # type: ignore[arg-type]
        )
        try:
            share.apply(0.5)
            assert str(child.pid) in procs_of(share.path)
            now = cgroup_of(Path(f"/proc/{child.pid}/cgroup").read_text(), mount.version)
            assert now.endswith(f"/duet/{unit}/decode")
            quota = read_quota(CgroupFs(), share.path, mount.version)
            if limit == "quota":
                assert quota == CpuQuota(round(0.5 * len(cores) * 100_000), 100_000)
            else:
                assert quota.quota_us is None
                control, weight = weight_file(mount.version, 0.5)
                assert (share.path / control).read_text().strip() == weight
        finally:
            share.close()
        assert not share.path.exists() and not share.path.parent.exists()
        assert cgroup_of(Path(f"/proc/{child.pid}/cgroup").read_text(), mount.version) == home
    finally:
        child.kill()
        child.wait()


def test_close_survives_a_home_that_is_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, proc = make_machine(tmp_path, 1, home="/session")
    share = open_share(root, proc, 1, "prefill", Recorder({0, 1}))
    (root / "session" / "cgroup.procs").unlink()
    (root / "session").rmdir()
    share.close()  # logs, does not raise: the cgroup still holds the process
    messages = [record.getMessage() for record in caplog.records]
    assert any("could not move 4242 back" in message for message in messages)
    assert any("could not remove" in message for message in messages)
    assert share.path.exists()


def test_real_cgroup_of_an_exited_process_is_removed() -> None:
    mount = detect_cpu_cgroup()
    if mount is None or not cgroup_writable(mount):
        pytest.skip(
            "needs a writable cgroup hierarchy with the cpu controller (root, no container)"
        )
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    share = CgroupCpuShare(
        mount,
        f"test-{os.getpid()}",
        "prefill",
        os.sched_getaffinity(0),
        pid=child.pid,
        set_threads=None,
    )
    try:
        share.apply(0.25)
    finally:
        child.kill()
        child.wait()
        share.close()
    assert not share.path.exists() and not share.path.parent.exists()
