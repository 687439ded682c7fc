import json
import subprocess
import sys

import pytest

from autotune.config import CONF_DIR, planner_config
from autotune.engine.config import ConfigError, build_train_config, load_train_config, to_yaml
from autotune.engine.model import build_model, count_params

# Published parameter counts (HF model cards / Megatron and EleutherAI calculators).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
}
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", MODELS)
def test_param_count_is_exact(name):
    cfg = planner_config([f"model={name}"]).train.model
    on_meta = sum(p.numel() for p in build_model(cfg, device="meta").parameters())
    assert count_params(cfg) == on_meta
    if name in PUBLISHED:
        assert on_meta == PUBLISHED[name]


def test_every_published_model_is_in_the_catalog():
    assert set(PUBLISHED) <= set(MODELS)


def test_unknown_model_names_the_choices():
    with pytest.raises(ConfigError, match="unknown model 'llama-9b'; available: .*llama-3-8b"):
        planner_config(["model=llama-9b"])


def test_bad_override_is_a_config_error():
    with pytest.raises(ConfigError):
        planner_config(["plan.zero_stage=three"])
    with pytest.raises(ConfigError, match=r"plan.no_such_key is not a setting of plan"):
        planner_config(["plan.no_such_key=1"])


@pytest.mark.parametrize("override", ["gpu=h100-sxm", "foo=1", "+foo=1"])
def test_an_unknown_section_names_the_sections(override):
    # the GPU is chosen through the cluster; `+name=` would add a section nothing reads
    with pytest.raises(ConfigError, match=r"model, job, plan, cluster, search, estimate"):
        planner_config([override])


@pytest.mark.parametrize(
    "plan, match",
    [
        ({"micro_batch": 3}, "not divisible by plan.micro_batch=3"),
        ({"offload_optimizer": True}, "offload_optimizer needs plan.zero_stage >= 1"),
        ({"zero_stage": 2, "offload_params": True}, "offload_params needs plan.zero_stage=3"),
        ({"precision": "fp16", "loss_scale": "none"}, "fp16 needs loss scaling"),
        ({"tp": 3}, "plan.tp=3 must divide model.n_heads"),
        ({"pp": 8}, "exceeds model.n_layers"),
        ({"precision": "fp8"}, "use one of fp32, bf16, fp16"),
        ({"grad_accum": 3}, "disagrees"),
        ({"sequence_parallel": True}, "needs plan.tp > 1"),
        ({"dp": 4, "dp_replicate": 2}, "plan.zero_stage=0 shards nothing; use plan.zero_stage=1, 2 or 3"),
    ],
)
def test_invalid_plans_say_what_to_change(plan, match):
    with pytest.raises(ConfigError, match=match):
        build_train_config({"model": {}, "job": {"global_batch": 8}, "plan": plan})


def test_grad_accum_is_derived():
    cfg = build_train_config({"job": {"global_batch": 16}, "plan": {"micro_batch": 2, "dp": 2}})
    assert cfg.plan.grad_accum == 4


def test_yaml_round_trip(tmp_path):
    cfg = planner_config(["model=qwen2.5-0.5b", "job.seq_len=128", "plan.precision=bf16"]).train
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    again = load_train_config(path, ["plan.micro_batch=2"])
    assert again.model == cfg.model and again.plan.precision == "bf16" and again.plan.micro_batch == 2


@pytest.mark.parametrize(
    "hf, expect",
    [
        ({"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
          "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "tie_word_embeddings": True}, 1_235_814_400),
        ({"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
          "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
          "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
          "tie_word_embeddings": True}, 494_032_768),
        ({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
          "n_positions": 1024}, 124_439_808),
    ],
)
def test_hf_config_json(tmp_path, hf, expect):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = planner_config([f"model.hf_config={tmp_path / 'config.json'}"]).train.model
    assert count_params(cfg) == expect


def test_hf_config_unsupported_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match="model_type 't5' is not supported; supported: llama, mistral, qwen2, gpt2"):
        planner_config([f"model.hf_config={tmp_path}"])


def test_cli_error_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "autotune", "estimate", "model=nope"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown model 'nope'")


def test_an_output_path_that_cannot_be_used_is_one_error_line(tmp_path, capsys):
    from autotune.cli import main

    taken = tmp_path / "a-file"
    taken.write_text("mine\n")
    assert main(["profile", "model=tiny", "cluster=1xh100", "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {taken}: File exists; give a path that can be used"]
    assert taken.read_text() == "mine\n"  # the user's file is untouched


@pytest.mark.parametrize("override, message", [
    ("search.sampler=bogus", "search.sampler='bogus': use one of tpe, gp, cmaes, random, grid"),
    ("search.mode=fast", "search.mode='fast': use one of auto, measure, analytic"),
    ("search.objective=speed", "search.objective='speed': use one of throughput, cost, pareto"),
    ("search.pruner=median", "search.pruner='median': use one of hyperband, halving, none"),
    ("search.precisions=[fp32,fp8]", "search.precisions='fp8': use one of fp32, bf16, fp16"),
    ("plan.precision=fp8", "plan.precision='fp8': use one of fp32, bf16, fp16"),
    ("plan.pp_schedule=2f2b", "plan.pp_schedule='2f2b': use one of gpipe, 1f1b, interleaved_1f1b"),
    ("plan.activation_checkpointing=some", "plan.activation_checkpointing='some': use one of none, full, selective, op, attention"),
    ("plan.kernels=cuda", "plan.kernels='cuda': use one of torch, triton"),
    ("model.family=t5", "model.family='t5': use one of llama, gpt2"),
    ("job.data.dtype=int8", "job.data.dtype='int8': use one of uint16, uint32"),
])
def test_a_bad_choice_is_one_line_naming_the_key_and_its_choices(override, message, capsys):
    from autotune.cli import main

    assert main(["estimate", override]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_choices_are_typed_and_read_as_their_text(tmp_path):
    cfg = planner_config(["plan.pp_schedule=gpipe", "plan.pp=2", "job.global_batch=8", "cluster.gpus_per_node=2",
                          "plan.precision=bf16"])
    assert type(cfg.plan.pp_schedule).__name__ == "PipelineSchedule" and cfg.plan.pp_schedule == "gpipe"
    assert f"{cfg.plan.precision}" == "bf16" and json.dumps(cfg.search.precisions) == '["fp32", "bf16", "fp16"]'
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg.train))
    assert "pp_schedule: gpipe" in path.read_text() and "precision: bf16" in path.read_text()
    again = load_train_config(path, ["plan.pp_schedule=1f1b"])  # a value that is not an identifier
    assert again.plan.pp_schedule == "1f1b" and again.plan.precision == cfg.plan.precision
    with pytest.raises(ConfigError, match=r"plan.precision='fp8': use one of fp32, bf16, fp16"):
        build_train_config({"plan": {"precision": "fp8"}})


def test_sections_without_options_and_unknown_keys():
    with pytest.raises(ConfigError, match=r"job has no options to choose \(only model and cluster do\)"):
        planner_config(["job=long"])
    with pytest.raises(ConfigError, match=r"plan.foo is not a setting of plan"):
        planner_config(["+plan.foo=1"])


def test_defaults_live_in_the_schema():
    """conf/ holds the options of the model and cluster groups; every other default is the schema's."""
    from autotune.config import GROUPS, PlannerConfig

    assert sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()) == sorted([*GROUPS, "gpu"])
    assert planner_config([]).search == PlannerConfig().search and planner_config([]).job == PlannerConfig().job
    tiny = planner_config([]).model
    assert tiny.name == "tiny" and tiny == build_train_config({"model": {"n_kv_heads": 2}}).model
