"""Mixture-of-experts plans in the search, the emitted files and the report: ep is a search
dimension, best.yaml carries it, ds_config.json and launch.sh say where DeepSpeed sets it, and
report.md explains the ep chosen, with the model's active parameters and its router's imbalance."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

import autotune.emit as emit
from autotune.cli import main
from autotune.config import ClusterConfig, planner_config
from autotune.engine.config import build_train_config, load_train_config
from autotune.search import command
from fake_probe import HARDWARE, FakeProbe

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = yaml.safe_load((ROOT / "conf" / "model" / "tiny-moe.yaml").read_text())


def moe_train(model: str = "qwen2-57b-a14b", **plan):
    data = yaml.safe_load((ROOT / "conf" / "model" / f"{model}.yaml").read_text())
    return build_train_config({"model": data, "job": {"global_batch": 16}, "plan": {"dp": 8, **plan}})


@pytest.mark.parametrize("zero, ep", [(2, 4), (3, 8), (1, 1)])
def test_ds_config_and_launch_say_where_deepspeed_sets_expert_parallelism(tmp_path, zero, ep):
    """DeepSpeed has no config key for expert parallelism (it is ep_size of deepspeed.moe.layer.MoE,
    in the model code): ds_config.json's `autotune` key names the value and the call, and what
    DeepSpeed's MoE lacks or refuses; launch.sh's header says the same."""
    cfg = moe_train(zero_stage=zero, ep=ep)
    extra = emit.ds_config(cfg)["autotune"]
    assert extra["expert_parallel"] == ep
    for words in (f"ep_size={ep}", "num_experts=64", "k=8", "deepspeed.moe.layer.MoE", "drop_tokens=False",
                  "split_params_into_different_moe_groups_for_optimizer", "shared expert"):
        assert words in extra["note"], words
    assert ("MoE not supported with Stage 3" in extra["note"]) == (zero == 3)
    emit.write_outputs(tmp_path, cfg, ClusterConfig(gpus_per_node=8))
    assert load_train_config(tmp_path / "best.yaml").plan.ep == ep
    assert f"ep={ep}" in (tmp_path / "launch.sh").read_text() and f"ep_size={ep}" in (tmp_path / "launch.sh").read_text()
    dense = build_train_config({"job": {"global_batch": 16}, "plan": {"dp": 8}})
    assert "ep_size" not in emit.ds_config(dense)["autotune"]["note"]
    assert "Expert parallelism" not in emit.launch_script(dense, ClusterConfig(gpus_per_node=8))


def test_analytic_search_of_mixtral_explains_its_choice_of_ep(tmp_path, capsys):
    """The issue's command: every ep that divides dp and the 8 experts is searched, best.yaml and
    ds_config.json carry the chosen one, and report.md says why it beats each other ep."""
    run = tmp_path / "run"
    assert main(["search", "model=mixtral-8x7b", "cluster=8xh100", "search.mode=analytic", "--out", str(run)]) == 0
    candidates = __import__("pandas").read_csv(run / "candidates.csv")
    assert sorted(candidates["ep"].unique()) == [1, 2, 4, 8] and (candidates["tp"] == 1).all()
    best = load_train_config(run / "best.yaml").plan
    assert json.loads((run / "ds_config.json").read_text())["autotune"]["expert_parallel"] == best.ep
    report = (run / "report.md").read_text()
    section = report[report.index("## Mixture of experts"):report.index("## What was measured")]
    assert "46.7B parameters, 12.9B active per token" in section
    assert f"Expert parallelism chosen: **ep={best.ep}**" in section
    others = [ep for ep in (1, 2, 4, 8) if ep != best.ep]
    why = section[section.index("### Why this ep"):section.index("### Load imbalance")]
    assert all(f"against ep={ep} " in why or f"ep={ep}: no plan fits" in why for ep in others), why
    assert "assumes a router that spreads tokens evenly" in section  # nothing measured it
    assert json.loads((run / "search.json").read_text())["params"]["active"] == 12_879_925_248


class RoutingProbe(FakeProbe):
    """The fake probe, with the router figures the engine's probe reports for a MoE model."""

    def __call__(self, train, trial_dir, **kwargs):
        run = super().__call__(train, trial_dir, **kwargs)
        if run.metrics is not None and run.metrics.get("status") == "ok":
            run.metrics["moe"] = {"aux_loss": 0.011, "imbalance": 1.3 + 0.1 * train.plan.ep,
                                  "imbalance_max": 1.9, "dropped": 0.0}
        return run


def test_measured_search_of_a_moe_model_reports_the_measured_imbalance(tmp_path, monkeypatch):
    """A measured search (the fake probe on a fixed CPU, 2 ranks): the trials carry the probe's
    imbalance, the estimate is recalibrated with it, and report.md shows it."""
    from autotune.reports.load import load_run

    monkeypatch.setattr(command, "load_hardware", lambda cluster: dataclasses.replace(
        HARDWARE, gpus_per_node=cluster.gpus_per_node, nodes=cluster.nodes))
    run = tmp_path / "run"
    pc = planner_config(["model=tiny-moe", "cluster=local", "cluster.gpus_per_node=2", "job.global_batch=4",
                         "job.seq_len=32", "search.precisions=[fp32]", "search.trials=4", "search.finalists=0",
                         "search.probe_steps=2", "search.warmup_steps=1"])
    assert command.search(pc, run, run.name, probe=RoutingProbe()) == 0
    trials = load_run(run).measured
    assert trials.meas_moe_imbalance.notna().all()
    learned = json.loads((run / "search.json").read_text())["result"]["learned"]["moe_imbalance"]
    assert learned == pytest.approx(trials.meas_moe_imbalance.median())
    section = (run / "report.md").read_text().split("## Mixture of experts")[1]
    assert f"Measured by the probe over {len(trials)} trial(s)" in section and "1.90 in the worst layer" in section
    assert f"estimated every plan again with an imbalance of {learned:.2f}" in section
    assert "| ep=2 | Z" in section and " ep2 |" in section  # every ep's best plan, labelled with its ep
