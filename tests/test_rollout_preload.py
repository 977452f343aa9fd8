"""rollout.preload: finding tcmalloc / Intel OpenMP, the LD_PRELOAD value, and the rollout actor's
runtime_env (pure functions: no Ray, no vLLM)."""

from cycle_oracle.config import RolloutSettings
from cycle_oracle.rollout import cpu_preload_libraries, preload_env, rollout_runtime_env


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_finds_each_library_where_present(tmp_path):
    venv, system = tmp_path / "venv" / "lib", tmp_path / "usr" / "lib"
    assert cpu_preload_libraries([str(venv), str(system)]) == []  # nothing there: nothing preloaded
    iomp = _touch(venv / "libiomp5.so")
    assert cpu_preload_libraries([str(venv), str(system)]) == [iomp]
    _touch(system / "libtcmalloc.so.4")
    minimal = _touch(system / "libtcmalloc_minimal.so.4")  # preferred over the full tcmalloc
    assert cpu_preload_libraries([str(venv), str(system)]) == [minimal, iomp]
    assert cpu_preload_libraries([str(tmp_path / "missing")]) == []


def test_ld_preload_keeps_existing_entries_once():
    assert preload_env(["/a/libiomp5.so"], "") == "/a/libiomp5.so"
    assert preload_env(["/a/x.so", "/b/y.so"], "/c/z.so:/a/x.so") == "/a/x.so:/b/y.so:/c/z.so"
    assert preload_env(["/a/x.so"], "/c/z.so /d/w.so") == "/a/x.so:/c/z.so:/d/w.so"  # ld.so also splits on spaces
    assert preload_env([], "/c/z.so") == "/c/z.so"


def test_ld_preload_defaults_to_this_process(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/c/z.so")
    assert preload_env(["/a/x.so"]) == "/a/x.so:/c/z.so"
    monkeypatch.delenv("LD_PRELOAD")
    assert preload_env(["/a/x.so"]) == "/a/x.so"


def test_rollout_runtime_env_only_for_auto(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    libs = ["/x/libiomp5.so"]
    assert RolloutSettings().preload == "none"
    assert rollout_runtime_env(RolloutSettings(), libs) == {}
    assert rollout_runtime_env(RolloutSettings(preload="none"), libs, {"env_vars": {"A": "1"}}) == {"env_vars": {"A": "1"}}
    assert rollout_runtime_env(RolloutSettings(preload="auto"), []) == {}  # nothing found: nothing changes
    assert rollout_runtime_env(RolloutSettings(preload="auto"), libs) == {"env_vars": {"LD_PRELOAD": "/x/libiomp5.so"}}
    base = {"env_vars": {"A": "1", "LD_PRELOAD": "/y/z.so"}, "pip": ["p"]}
    merged = rollout_runtime_env(RolloutSettings(preload="auto"), libs, base)
    assert merged == {"env_vars": {"A": "1", "LD_PRELOAD": "/x/libiomp5.so:/y/z.so"}, "pip": ["p"]}
    assert base["env_vars"]["LD_PRELOAD"] == "/y/z.so"  # the caller's dict is not changed


def test_rollout_runtime_env_finds_the_libraries_itself(monkeypatch, tmp_path):
    import cycle_oracle.rollout as ro

    lib = _touch(tmp_path / "libiomp5.so")
    monkeypatch.setattr(ro, "preload_search_dirs", lambda: [str(tmp_path)])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert rollout_runtime_env(RolloutSettings(preload="auto")) == {"env_vars": {"LD_PRELOAD": lib}}


def test_placement_options_carry_the_rollout_runtime_env(monkeypatch):
    """Placement.options (every RolloutActor is created through it) adds the runtime_env for the rollout role only."""
    from actors.placement import Placement

    import cycle_oracle.rollout as ro

    monkeypatch.setattr(ro, "cpu_preload_libraries", lambda dirs=None: ["/x/libiomp5.so"])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    p = Placement.__new__(Placement)  # no Ray: only the plan and the settings
    p.plan = [{"role": "learner", "index": 0, "bundle": {"CPU": 1}}, {"role": "rollout", "index": 0, "bundle": {"CPU": 1}}]
    p.group = None
    p.rollout_settings = RolloutSettings(preload="auto")
    assert p.options("rollout", 0)["runtime_env"] == {"env_vars": {"LD_PRELOAD": "/x/libiomp5.so"}}
    assert "runtime_env" not in p.options("learner", 0)
    p.rollout_settings = RolloutSettings()
    assert "runtime_env" not in p.options("rollout", 0, max_restarts=3)
