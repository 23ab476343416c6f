"""`make sysdeps` (.ci/sysdeps, run by `make test` as root) leaves no system service enabled or
running (issue 19 item 9): Debian starts and enables every daemon it installs, so the install
used to leave postfix, haproxy, redis-server and prometheus (and what they recommend) running
and enabled on the host. The tests start private instances; none is wanted as a service.

The Debian here is a fake, so nothing is installed or started on this machine: a directory with
apt-get, dpkg-query, dpkg, systemctl, update-rc.d, service and id scripts that keep their state
in files (installed packages, enabled units, running services). Its apt-get behaves as Debian's
maintainer scripts do: each new package's services are enabled, then started unless
policy-rc.d (under SYSDEPS_ROOT) exits 101. `make` runs with a PATH of that directory and the
few real tools the recipe needs, so the real postfix, redis-server, ... are not found (missing:
install) and the real apt-get is never reached.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.kit.harness import ROOT

pytestmark = pytest.mark.timeout(60)

# package -> (commands, recommends, systemd units, init scripts)
PACKAGES: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "postfix": (["postfix", "smtp-source"], [],
                ["postfix.service", "postfix@.service", "postfix-resolvconf.path"], ["postfix"]),
    "swaks": (["swaks"], [], [], []),
    "systemd": (["systemd-analyze"], [], ["systemd-timesyncd.service"], []),
    "haproxy": (["haproxy"], [], ["haproxy.service"], ["haproxy"]),
    "prometheus": (["prometheus", "promtool"], ["prometheus-node-exporter"],
                   ["prometheus.service"], ["prometheus"]),
    "prometheus-node-exporter": ([], ["smartmontools"],
                                 ["prometheus-node-exporter.service",
                                  "prometheus-node-exporter-apt.timer"],
                                 ["prometheus-node-exporter"]),
    "smartmontools": ([], [], ["smartmontools.service"], ["smartmontools"]),
    "redis-server": (["redis-server"], [], ["redis-server.service"], ["redis-server"]),
    "unbound": (["unbound"], ["dns-root-data"], ["unbound.service", "unbound-resolvconf.service"],
                ["unbound"]),
    "dns-root-data": ([], [], [], []),
}

# the real tools the Makefile recipe and .ci/sysdeps use
TOOLS = ["bash", "sh", "env", "mktemp", "rm", "mv", "chmod", "cat", "sort", "comm", "awk",
         "sed", "grep", "mkdir", "dirname", "basename", "touch", "ls", "cp", "head", "tr"]

APT_GET = r"""#!/usr/bin/env bash
W="$FAKE_WORLD"
echo "apt-get $*" >>"$W/log"
[ "$1" = update ] && exit 0
[ -e "$W/fail-install" ] && { echo "E: fake failure" >&2; exit 100; }
queue=()
for a in "$@"; do case "$a" in install|-*) ;; *) queue+=("$a") ;; esac; done
while [ ${#queue[@]} -gt 0 ]; do
  p="${queue[0]}"; queue=("${queue[@]:1}")
  [ -e "$W/state/installed/$p" ] && continue
  touch "$W/state/installed/$p"
  for c in $(cat "$W/db/$p/commands"); do
    printf '#!/bin/sh\nexit 0\n' >"$W/bin/$c"; chmod 755 "$W/bin/$c"
  done
  for r in $(cat "$W/db/$p/recommends"); do queue+=("$r"); done
  # postinst: deb-systemd-helper enable / update-rc.d defaults, then invoke-rc.d start
  for u in $(cat "$W/db/$p/units") $(cat "$W/db/$p/scripts"); do
    case "$u" in *@.*) continue ;; esac
    touch "$W/state/enabled/$u"
    rc=0
    if [ -x "$SYSDEPS_ROOT/usr/sbin/policy-rc.d" ]; then
      "$SYSDEPS_ROOT/usr/sbin/policy-rc.d" "$u" start; rc=$?
    fi
    [ "$rc" = 101 ] || touch "$W/state/running/$u"
  done
done
exit 0
"""

DPKG_QUERY = r"""#!/usr/bin/env bash
for p in $(ls "$FAKE_WORLD/state/installed"); do echo "$p install ok installed"; done
"""

DPKG = r"""#!/usr/bin/env bash
[ "$1" = -L ] && [ -e "$FAKE_WORLD/state/installed/$2" ] || exit 1
cat "$FAKE_WORLD/db/$2/files"
"""

SYSTEMCTL = r"""#!/usr/bin/env bash
W="$FAKE_WORLD"
echo "systemctl $*" >>"$W/log"
cmd="$1"; shift
args=(); for a in "$@"; do case "$a" in -*) ;; *) args+=("$a") ;; esac; done
booted() { [ -d "$SYSDEPS_ROOT/run/systemd/system" ]; }
case "$cmd" in
  disable) for u in "${args[@]}"; do rm -f "$W/state/enabled/$u"; done ;;
  is-active) booted || exit 1; [ -e "$W/state/running/${args[0]}" ] ;;
  stop) booted || exit 1; rm -f "$W/state/running/${args[0]}" ;;
  *) exit 1 ;;
esac
"""

SERVICE = r"""#!/usr/bin/env bash
echo "service $*" >>"$FAKE_WORLD/log"
case "$2" in
  status) [ -e "$FAKE_WORLD/state/running/$1" ] ;;
  stop) rm -f "$FAKE_WORLD/state/running/$1" ;;
  *) exit 1 ;;
esac
"""

UPDATE_RC_D = r"""#!/usr/bin/env bash
echo "update-rc.d $*" >>"$FAKE_WORLD/log"
[ "$2" = disable ] && rm -f "$FAKE_WORLD/state/enabled/$1"
exit 0
"""


class FakeDebian:
    def __init__(self, tmp: Path, booted: bool = False) -> None:
        self.w = tmp / "world"
        self.root = tmp / "root"             # SYSDEPS_ROOT
        self.bin = self.w / "bin"
        for d in ("bin", "tools", "state/installed", "state/enabled", "state/running"):
            (self.w / d).mkdir(parents=True)
        (self.root / "usr" / "sbin").mkdir(parents=True)
        if booted:
            (self.root / "run" / "systemd" / "system").mkdir(parents=True)
        for p, (cmds, recs, units, scripts) in PACKAGES.items():
            d = self.w / "db" / p
            d.mkdir(parents=True)
            (d / "commands").write_text("\n".join(cmds))
            (d / "recommends").write_text("\n".join(recs))
            (d / "units").write_text("\n".join(units))
            (d / "scripts").write_text("\n".join(scripts))
            files = [f"/usr/sbin/{c}" for c in cmds] + \
                [f"/lib/systemd/system/{u}" for u in units] + [f"/etc/init.d/{s}" for s in scripts]
            (d / "files").write_text("".join(f + "\n" for f in files))
        for name, text in (("apt-get", APT_GET), ("dpkg-query", DPKG_QUERY), ("dpkg", DPKG),
                           ("systemctl", SYSTEMCTL), ("service", SERVICE),
                           ("update-rc.d", UPDATE_RC_D), ("id", "#!/bin/sh\necho 0\n")):
            self.script(name, text)
        for t in TOOLS:
            real = shutil.which(t)
            assert real, t
            (self.w / "tools" / t).symlink_to(real)
        (self.w / "log").touch()

    def script(self, name: str, text: str) -> None:
        f = self.bin / name
        f.write_text(text)
        f.chmod(0o755)

    def preinstall(self, pkg: str, running: bool = True) -> None:
        """A package the operator had before: installed, its services enabled (and running)."""
        cmds, _, units, scripts = PACKAGES[pkg]
        (self.w / "state" / "installed" / pkg).touch()
        for c in cmds:
            self.script(c, "#!/bin/sh\nexit 0\n")
        for u in [*units, *scripts]:
            if "@." not in u:
                (self.w / "state" / "enabled" / u).touch()
                if running:
                    (self.w / "state" / "running" / u).touch()

    def make(self) -> subprocess.CompletedProcess[str]:
        env = {"PATH": f"{self.bin}:{self.w / 'tools'}", "FAKE_WORLD": str(self.w),
               "SYSDEPS_ROOT": str(self.root), "HOME": str(self.w), "LC_ALL": "C"}
        return subprocess.run([shutil.which("make") or "make", "-s", "-C", str(ROOT),
                               "sysdeps"], env=env, capture_output=True, text=True, timeout=30)

    def names(self, what: str) -> set[str]:
        return {p.name for p in (self.w / "state" / what).iterdir()}

    @property
    def policy(self) -> Path:
        return self.root / "usr" / "sbin" / "policy-rc.d"

    def log(self) -> str:
        return (self.w / "log").read_text()


def services_of(*pkgs: str) -> set[str]:
    return {u for p in pkgs for u in [*PACKAGES[p][2], *PACKAGES[p][3]] if "@." not in u}


@pytest.fixture(autouse=True)
def _needs_make() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")


@pytest.mark.parametrize("booted", [False, True], ids=["no-systemd", "systemd-pid1"])
def test_install_leaves_no_service_enabled_or_running(tmp_path: Path, booted: bool) -> None:
    deb = FakeDebian(tmp_path, booted)
    r = deb.make()
    assert r.returncode == 0, r.stderr
    assert "apt-get install" in deb.log()
    assert deb.names("installed") == set(PACKAGES)       # recommends included
    assert deb.names("running") == set(), deb.log()
    # every daemon this install brought is disabled; the init system's own units are left
    assert deb.names("enabled") == {"systemd-timesyncd.service"}, deb.log()
    assert not deb.policy.exists() and not list(deb.policy.parent.iterdir())
    # idempotent: nothing is missing now, so nothing is done
    before = deb.log()
    r = deb.make()
    assert r.returncode == 0 and deb.log() == before, r.stderr


def test_the_operators_services_and_policy_are_kept(tmp_path: Path) -> None:
    """postfix was installed, enabled and running before (the operator's MTA): it stays so. The
    operator's own policy-rc.d (one allowing everything) is put back byte for byte, with its
    mode, and did not apply during the install."""
    deb = FakeDebian(tmp_path)
    deb.preinstall("postfix")
    deb.policy.write_text("#!/bin/sh\n# the operator's\nexit 0\n")
    deb.policy.chmod(0o750)
    r = deb.make()
    assert r.returncode == 0, r.stderr
    assert deb.names("running") == services_of("postfix"), deb.log()
    assert deb.names("enabled") == services_of("postfix") | {"systemd-timesyncd.service"}
    assert not any(f" {s}" in line for s in services_of("postfix")
                   for line in deb.log().splitlines() if not line.startswith("apt-get")), \
        deb.log()
    assert deb.policy.read_text() == "#!/bin/sh\n# the operator's\nexit 0\n"
    assert stat.S_IMODE(deb.policy.stat().st_mode) == 0o750
    assert [p.name for p in deb.policy.parent.iterdir()] == ["policy-rc.d"]


def test_a_failed_install_puts_the_policy_back(tmp_path: Path) -> None:
    deb = FakeDebian(tmp_path)
    deb.policy.write_text("#!/bin/sh\nexit 101\n")
    deb.policy.chmod(0o755)
    (deb.w / "fail-install").touch()
    r = deb.make()
    assert r.returncode != 0
    assert deb.policy.read_text() == "#!/bin/sh\nexit 101\n"
    assert [p.name for p in deb.policy.parent.iterdir()] == ["policy-rc.d"]


def test_a_killed_run_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    """A run SIGKILLed mid-install left its deny-all policy-rc.d and the operator's saved one:
    the next run puts the operator's back (and still starts nothing)."""
    deb = FakeDebian(tmp_path)
    sysdeps = (ROOT / ".ci" / "sysdeps").read_text()
    mark = sysdeps.split("MARK='", 1)[1].split("'", 1)[0]
    deb.policy.write_text(f"#!/bin/sh\n# {mark}\nexit 101\n")
    saved = deb.policy.with_name("policy-rc.d.smtp-ingress-saved")
    saved.write_text("#!/bin/sh\n# the operator's\nexit 0\n")
    saved.chmod(0o755)
    r = deb.make()
    assert r.returncode == 0, r.stderr
    assert deb.names("running") == set()
    assert deb.policy.read_text() == "#!/bin/sh\n# the operator's\nexit 0\n"
    assert [p.name for p in deb.policy.parent.iterdir()] == ["policy-rc.d"]


def test_sysdeps_script_is_executable() -> None:
    assert os.access(ROOT / ".ci" / "sysdeps", os.X_OK)
