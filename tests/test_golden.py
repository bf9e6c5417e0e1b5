"""The export of the shipped fine-tuned model equals the PyTorch golden outputs (golden/)."""
from __future__ import annotations

import numpy as np
import pytest

from graphkit.ortrun import DecoderRunner

TOL = 1e-4


@pytest.fixture(scope="module")
def merged_runner(exported_example):
    return DecoderRunner.from_file(exported_example)


@pytest.fixture(scope="module")
def base_runner(exported_base):
    return DecoderRunner.from_file(exported_base)


def test_prefill_logits_match_pytorch(golden, merged_runner, base_runner):
    for i, rec in enumerate(golden["prompts"]):
        ids = np.array([rec["prompt_ids"]], np.int64)
        for runner, key in ((merged_runner, "adapter"), (base_runner, "base")):
            logits = runner.step(ids, np.ones_like(ids), runner.empty_past(1)).logits[0, -1]
            ref = golden["arrays"][f"prefill_last_logits_{key}"][i]
            assert np.abs(logits - ref).max() <= TOL, (i, key, float(np.abs(logits - ref).max()))


def test_greedy_32_tokens_equal_golden(golden, merged_runner, base_runner):
    n = golden["meta"]["n_new_tokens"]
    assert n == 32
    for rec in golden["prompts"]:
        assert merged_runner.greedy(rec["prompt_ids"], n)[0] == rec["greedy_ids_adapter"]
        assert base_runner.greedy(rec["prompt_ids"], n)[0] == rec["greedy_ids_base"]


def test_adapter_changes_the_output(golden):
    """The merged export is the fine-tuned model: its greedy ids differ from the base's on every prompt."""
    for rec in golden["prompts"]:
        assert rec["greedy_ids_adapter"] != rec["greedy_ids_base"]
        assert "Motivo de ingreso" in rec["greedy_text_adapter"]
        assert "Motivo de ingreso" not in rec["greedy_text_base"]


def test_merged_export_equals_peft_base_plus_adapter(golden, merged_runner):
    """prefill_last_logits_adapter come from peft's unmerged base+adapter model, not the merge."""
    rec = golden["prompts"][0]
    ids = np.array([rec["prompt_ids"]], np.int64)
    logits = merged_runner.step(ids, np.ones_like(ids), merged_runner.empty_past(1)).logits[0, -1]
    peft_ref = golden["arrays"]["prefill_last_logits_adapter"][0]
    base_ref = golden["arrays"]["prefill_last_logits_base"][0]
    assert np.abs(logits - peft_ref).max() <= TOL
    assert np.abs(logits - base_ref).max() > 1.0
