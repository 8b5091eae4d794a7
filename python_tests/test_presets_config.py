"""Presets, ``python -m bsa_ext config`` (including every failure case), the tiny tuning study, examples."""

from __future__ import annotations

import json
import os
import runpy
import sys

import pytest

from bsa_ext import config_tool, presets, tuning
from bsa_ext.capabilities import KERNEL_CAPACITIES
from bsa_ext.layout import ChunkGeometry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RELEASED = {
    "_class_name": "LongCatVideoTransformer3DModel",
    "hidden_size": 4096,
    "bsa_params": {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]},
    "enable_bsa": False,
    "cp_split_hw": [1, 1],
}


# ------------------------------------------------------------------ presets
def test_presets_are_the_issue_list_and_valid():
    assert presets.preset_names() == ["480p", "720p-balanced", "720p-quality", "720p-fast", "720p-adaptive", "long-video"]
    assert presets.default_preset_name() == "720p-balanced"
    expect = {
        "720p-balanced": (0.9375, None, [4, 4, 4]),
        "720p-quality": (0.875, None, [4, 4, 4]),
        "720p-fast": (0.96875, None, [4, 4, 4]),
        "720p-adaptive": (0.875, 0.98, [4, 4, 4]),
        "long-video": (0.9375, None, [8, 4, 4]),
    }
    assert not presets.get_preset("480p").enable_bsa and presets.get_preset("480p").bsa_params is None
    for name, (sparsity, cdf, chunk) in expect.items():
        p = presets.get_preset(name)
        assert p.enable_bsa and p.description and p.use
        bp = p.bsa_params
        assert (bp["sparsity"], bp["cdf_threshold"], bp["chunk_3d_shape_q"], bp["chunk_3d_shape_k"]) == (sparsity, cdf, chunk, chunk)
        # SPEC ranges, checked here independently of validate_bsa_params.
        assert 0 <= bp["sparsity"] < 1 and (cdf is None or 0 < cdf <= 1)
        assert ChunkGeometry((8, 8, 8), tuple(chunk)).capacity in KERNEL_CAPACITIES
        assert presets.match_preset(True, bp) == name


def test_preset_params_are_copies():
    a = presets.get_preset("720p-balanced").params()
    a["sparsity"] = 0.5
    assert presets.get_preset("720p-balanced").params()["sparsity"] == 0.9375


def test_defaults_come_from_the_function_signature():
    import inspect

    import bsa_ext

    sig = inspect.signature(bsa_ext.flash_attn_bsa_3d)
    d = presets.default_bsa_params()
    assert d["sparsity"] == sig.parameters["sparsity"].default
    assert d["chunk_3d_shape_q"] == list(sig.parameters["chunk_3d_shape_q"].default)


@pytest.mark.parametrize(
    "params, match",
    [
        ([0.9], "expected a dict"),
        ({"sparsity": -0.1}, r"\[0, 1\)"),
        ({"sparsity": True}, "sparsity"),
        ({"sparsity": float("nan")}, "sparsity"),
        ({"cdf_threshold": 1.5}, r"\(0, 1\]"),
        ({"chunk_3d_shape_q": [4, 4, 4.0]}, "integers"),
        ({"chunk_3d_shape_q": "4,4,4"}, "list of three"),
        ({"chunk_3d_shape_k": [0, 4, 4]}, "positive"),
        ({"chunk_3d_shape_k": [8, 8, 8]}, "512"),
        ({"sparsity": None}, "at least one"),
        ({"max_blocks": 4}, "runtime-only"),
    ],
)
def test_validate_rejects(params, match):
    with pytest.raises(presets.BSAParamError, match=match):
        presets.validate_bsa_params(params)


def test_validate_runtime_extras_and_defaults():
    out = presets.validate_bsa_params({"sparsity": None, "cdf_threshold": 0.9, "max_blocks": 3, "backend": "torch"}, allow_runtime=True)
    assert out == {"sparsity": None, "cdf_threshold": 0.9, "max_blocks": 3, "backend": "torch"}
    with pytest.raises(presets.BSAParamError, match="max_blocks"):
        presets.validate_bsa_params({"max_blocks": 0}, allow_runtime=True)
    with pytest.raises(presets.BSAParamError, match="backend"):
        presets.validate_bsa_params({"backend": "tpu"}, allow_runtime=True)
    full = presets.validate_bsa_params({"sparsity": 0}, fill_defaults=True)
    assert full["sparsity"] == 0.0 and full["chunk_3d_shape_q"] == [4, 4, 8]


# ------------------------------------------------------------------ config tool
@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "dit" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(RELEASED, indent=4) + "\n")
    return path


def _run(capsys, *argv):
    rc = config_tool.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _load(path):
    return json.loads(path.read_text())


def test_status_of_the_released_config(cfg, capsys):
    rc, out, _ = _run(capsys, cfg)
    assert rc == 0 and "enable_bsa: false" in out and "valid:      yes" in out and "480p (BSA off)" in out
    rc, out, _ = _run(capsys, cfg.parent.parent, "--status")  # a checkpoint directory: finds dit/config.json
    assert rc == 0 and str(cfg) in out


def test_preset_edit_keeps_other_keys_backs_up_and_restores(cfg, capsys):
    original = cfg.read_text()
    rc, out, _ = _run(capsys, cfg, "--preset", "720p-adaptive")
    assert rc == 0 and "enable_bsa: false -> true" in out and "cdf_threshold: <unset> -> 0.98" in out
    data = _load(cfg)
    assert data["enable_bsa"] is True and data["bsa_params"] == presets.get_preset("720p-adaptive").bsa_params
    assert {k: v for k, v in data.items() if k not in ("enable_bsa", "bsa_params")} == {
        k: v for k, v in RELEASED.items() if k not in ("enable_bsa", "bsa_params")
    }
    assert '"chunk_3d_shape_q": [4, 4, 4]' in cfg.read_text() and '\n    "hidden_size"' in cfg.read_text()
    bak = str(cfg) + config_tool.BACKUP_SUFFIX
    assert open(bak).read() == original
    # A second edit keeps the first backup: --restore goes back to the file before bsa_ext touched it.
    assert _run(capsys, cfg, "--preset", "720p-fast")[0] == 0
    assert open(bak).read() == original
    rc, out, _ = _run(capsys, cfg, "--restore")
    assert rc == 0 and cfg.read_text() == original and not os.path.exists(bak)
    rc, _, err = _run(capsys, cfg, "--restore")
    assert rc == 2 and "no backup" in err


def test_enable_disable_set_and_no_change(cfg, capsys):
    assert _run(capsys, cfg, "--enable")[0] == 0
    assert _load(cfg)["enable_bsa"] is True and _load(cfg)["bsa_params"] == RELEASED["bsa_params"]
    rc, out, _ = _run(capsys, cfg, "--enable")
    assert rc == 0 and "nothing written" in out
    rc, out, _ = _run(capsys, cfg, "--disable", "--set", "sparsity=0.8", "--set", "bsa_params.chunk_3d_shape_k=4x4x8",
                      "--set", "cdf_threshold=null")
    assert rc == 0
    data = _load(cfg)
    assert data["enable_bsa"] is False
    assert data["bsa_params"] == {"sparsity": 0.8, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 8], "cdf_threshold": None}
    assert _run(capsys, cfg, "--set", "enable_bsa=true", "--set", "chunk_3d_shape_q=[2,4,4]")[0] == 0
    assert _load(cfg)["enable_bsa"] is True and _load(cfg)["bsa_params"]["chunk_3d_shape_q"] == [2, 4, 4]


def test_enable_without_params_adds_the_default_preset(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64}')
    assert _run(capsys, path, "--enable", "--no-backup")[0] == 0
    assert _load(path)["bsa_params"] == presets.get_preset("720p-balanced").bsa_params
    assert not os.path.exists(str(path) + config_tool.BACKUP_SUFFIX)


def test_dry_run_writes_nothing(cfg, capsys):
    before = cfg.read_text()
    rc, out, _ = _run(capsys, cfg, "--preset", "long-video", "--dry-run")
    assert rc == 0 and "dry run" in out and "[8, 4, 4]" in out
    assert cfg.read_text() == before and not os.path.exists(str(cfg) + config_tool.BACKUP_SUFFIX)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--preset", "720p-turbo"], "unknown name '720p-turbo'"),
        (["--set", "block_size=64"], "unknown key"),
        (["--set", "sparsity"], "key=value"),
        (["--set", "sparsity=0.9.1"], "not a JSON value"),
        (["--set", "sparsity=1.5"], r"sparsity: expected a number in \[0, 1\)"),
        (["--set", "sparsity=\"0.9\""], "got str"),
        (["--set", "chunk_3d_shape_q=4,4"], "chunk_3d_shape_q"),
        (["--set", "chunk_3d_shape_q=4,4,a"], "three integers"),
        (["--set", "chunk_3d_shape_q=4,4,3"], "capacity"),
        (["--set", "enable_bsa=maybe"], "not a JSON value"),
        (["--set", "enable_bsa=1.0"], "true or false"),
        (["--set", "sparsity=null"], "at least one"),
        (["--status", "--set", "sparsity=0.9"], "cannot be combined"),
    ],
)
def test_bad_requests_leave_the_file_alone(cfg, capsys, argv, match):
    before = cfg.read_text()
    rc, _, err = _run(capsys, cfg, *argv)
    assert rc == 2 and err.startswith("bsa_ext config: error:")
    import re

    assert re.search(match, err), err
    assert cfg.read_text() == before and not os.path.exists(str(cfg) + config_tool.BACKUP_SUFFIX)


def test_file_errors(tmp_path, capsys):
    rc, _, err = _run(capsys, tmp_path / "missing.json")
    assert rc == 2 and "no such file" in err
    rc, _, err = _run(capsys, tmp_path)
    assert rc == 2 and "a directory without" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"enable_bsa": true,\n  "bsa_params": {')
    rc, _, err = _run(capsys, bad, "--enable")
    assert rc == 2 and "not valid JSON" in err and "line 2" in err
    assert bad.read_text() == '{"enable_bsa": true,\n  "bsa_params": {'
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    rc, _, err = _run(capsys, arr)
    assert rc == 2 and "JSON object" in err
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00")
    rc, _, err = _run(capsys, binary)
    assert rc == 2 and "UTF-8" in err
    rc, _, err = _run(capsys)
    assert rc == 2 and "missing the config.json path" in err
    rc, _, err = _run(capsys, tmp_path / "x.json", "--enable", "--disable")
    assert rc == 2 and "not allowed with" in err


def test_wrong_types_in_the_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"enable_bsa": "yes", "bsa_params": {"sparsity": "high", "chunk_3d_shape_q": [4, 4, 4]}}))
    rc, out, _ = _run(capsys, path)
    assert rc == 1 and "valid:      NO" in out and "enable_bsa: expected true or false" in out and "sparsity" in out
    rc, _, err = _run(capsys, path, "--enable")
    assert rc == 2 and "nothing written" in err and "sparsity" in err  # enable keeps broken params: refused
    assert _run(capsys, path, "--preset", "720p-quality")[0] == 0  # a preset replaces them
    assert _load(path)["bsa_params"] == presets.get_preset("720p-quality").bsa_params
    path.write_text(json.dumps({"enable_bsa": True}))
    rc, out, _ = _run(capsys, path, "--status")
    assert rc == 1 and "bsa_params: missing" in out
    path.write_text(json.dumps({"enable_bsa": False, "bsa_params": [0.9]}))
    rc, _, err = _run(capsys, path, "--set", "sparsity=0.9")
    assert rc == 2 and "not an object" in err


def test_a_failed_write_leaves_the_original_and_no_temp_files(cfg, capsys, monkeypatch):
    before = cfg.read_text()
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.abspath(dst) == os.path.abspath(cfg):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(config_tool.os, "replace", failing_replace)
    rc, _, err = _run(capsys, cfg, "--preset", "720p-fast")
    assert rc == 2 and "No space left" in err
    assert cfg.read_text() == before
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.json", "config.json" + config_tool.BACKUP_SUFFIX]


def test_file_mode_is_kept(cfg, capsys):
    os.chmod(cfg, 0o600)
    assert _run(capsys, cfg, "--preset", "720p-fast")[0] == 0
    assert (os.stat(cfg).st_mode & 0o777) == 0o600


def test_list_presets_and_help(capsys):
    rc, out, _ = _run(capsys, "--list-presets")
    assert rc == 0 and all(name in out for name in presets.preset_names())
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0 and "--restore" in out


# ------------------------------------------------------------------ tuning study (tiny, CPU)
def test_tiny_tuning_study_writes_json_table_and_docs(tmp_path, capsys):
    doc = tmp_path / "presets.md"
    doc.write_text(f"# t\n{tuning.DOCS_BEGIN}\nold table\n{tuning.DOCS_END}\ntail\n")
    rc = tuning.main(["--tiny", "--out", str(tmp_path / "out"), "--presets", "480p,720p-balanced,720p-adaptive",
                      "--write-docs", str(doc), "--reps", "1"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "tuning.json").read_text())
    rows = {r["preset"]: r for r in report["rows"]}
    assert set(rows) == {"480p", "720p-balanced", "720p-adaptive"}
    bal, ada = rows["720p-balanced"], rows["720p-adaptive"]
    assert 0 < bal["mass_kept"] <= 1 + 1e-9 and 0 < bal["rel_err"] < 2 and bal["backend"] == "torch"
    # The adaptive preset keeps at least as many blocks as its top-k floor, so at least as much mass.
    assert ada["blocks_kept"] >= 0.125 - 1e-9 and ada["mass_kept"] >= bal["mass_kept"] - 1e-9
    text = doc.read_text()
    assert "old table" not in text and "| 720p-balanced |" in text and text.endswith(f"{tuning.DOCS_END}\ntail\n")
    assert "| preset |" in capsys.readouterr().out
    assert tuning.main(["--tiny", "--presets", "nope"]) == 2


def test_mass_kept_is_one_when_every_block_is_kept():
    import torch

    lat, chunk = (4, 4, 8), (2, 4, 4)
    g = ChunkGeometry(lat, chunk)
    q, k, _ = tuning.make_inputs(2, lat, 32, torch.float32, "cpu")
    idx = torch.arange(g.num_blocks, dtype=torch.int32).expand(1, 2, g.num_blocks, g.num_blocks).contiguous()
    cnt = torch.full((1, 2, g.num_blocks), g.num_blocks, dtype=torch.int32)
    assert abs(tuning.mass_kept(q, k, idx, cnt, g, g, rows=64, seed=0) - 1.0) < 1e-6
    cnt.fill_(0)
    assert tuning.mass_kept(q, k, idx, cnt, g, g, rows=64, seed=0) == 0.0


# ------------------------------------------------------------------ examples
EXAMPLES = ["basic_usage", "enable_at_runtime", "custom_parameters", "performance_comparison", "adaptive_cdf"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_run_on_cpu(name, monkeypatch, capsys):
    from bsa_ext.integrations import longcat

    examples = os.path.join(ROOT, "examples")
    monkeypatch.syspath_prepend(examples)
    monkeypatch.setattr(sys, "argv", [name + ".py"])
    try:
        runpy.run_path(os.path.join(examples, name + ".py"), run_name="__main__")
    finally:
        longcat.uninstall()
        sys.modules.pop("_toy_longcat", None)
    assert capsys.readouterr().out.strip()
