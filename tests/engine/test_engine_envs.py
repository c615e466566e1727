"""The engine's LLMC_* switches: read in one place (replicas/engine/envs.py), one default each; GEMV launch
configs are data files per device."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from replicas.engine.envs import Switches, read

ENGINE = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()) / "replicas" / "engine"


def test_defaults_when_nothing_is_set():
    assert read({}) == Switches()
    assert Switches() == Switches(no_fusion=False, gemv=True, gemv_max_m=1, gemv_max_m_quant=16, gemv_lm_head=True,
                                  gemv_configs=None, mixed_graphs=True, moe_grouped=None, tp_allreduce="symm")


def test_switches_as_the_environment_sets_them():
    s = read({"LLMC_NO_FUSION": "1", "LLMC_GEMV": "0", "LLMC_GEMV_MAX_M": "8", "LLMC_GEMV_MAX_M_QUANT": "4",
              "LLMC_GEMV_LM_HEAD": "", "LLMC_GEMV_CONFIGS": "/tmp/c.json", "LLMC_MIXED_GRAPHS": "0",
              "LLMC_MOE_GROUPED": "0", "LLMC_TP_ALLREDUCE": "nccl"})
    assert s == Switches(no_fusion=True, gemv=False, gemv_max_m=8, gemv_max_m_quant=4, gemv_lm_head=False,
                         gemv_configs="/tmp/c.json", mixed_graphs=False, moe_grouped=False, tp_allreduce="nccl")
    assert read({"LLMC_NO_FUSION": "0", "LLMC_GEMV": "", "LLMC_MIXED_GRAPHS": "", "LLMC_MOE_GROUPED": ""}) == \
        Switches(gemv=False, mixed_graphs=True, moe_grouped=None)  # set but empty: each as it always read
    assert read({"LLMC_MOE_GROUPED": "1"}).moe_grouped is True
    with pytest.raises(ValueError, match="LLMC_TP_ALLREDUCE"):
        read({"LLMC_TP_ALLREDUCE": "gloo"})


def test_no_engine_module_reads_an_llmc_switch_itself():
    readers = [p.relative_to(ENGINE).as_posix() for p in ENGINE.rglob("*.py")
               if p.name != "envs.py" and re.search(r"environ[^\n]*LLMC_", p.read_text())]
    assert readers == []


def test_gemv_config_files_are_well_formed():
    files = sorted((ENGINE / "kernels" / "gemv_configs").glob("*.json"))
    assert {p.stem for p in files} >= {"default", "H200"}
    for path in files:
        data = json.loads(path.read_text())
        tables = [data["one_row"]] + ([data["dot"]] if "dot" in data else [])
        for table in tables:
            for key, config in table.items():
                assert all(int(v) > 0 for v in key.split(",")) and len(key.split(",")) == 2, (path.name, key)
                assert len(config) == 3 and all(isinstance(v, int) and v > 0 for v in config), (path.name, key)
    default = json.loads((ENGINE / "kernels" / "gemv_configs" / "default.json").read_text())
    assert len(default["one_row_default"]) == 3 and len(default["dot_default"]) == 3
