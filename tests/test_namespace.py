"""Everything the project installs lives under the one import name `autotune`: a venv that also has
packages named `kernels` (Hugging Face's, which transformers 5 installs), `engine` or `reports`
runs the planner and the engine unchanged."""
import subprocess
import sys


def test_foreign_top_level_packages_change_nothing(tmp_path):
    for name in ("kernels", "engine", "reports"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"FOREIGN = {name!r}\n")
    script = (
        "import kernels, engine, reports\n"
        "assert kernels.FOREIGN == 'kernels' and engine.FOREIGN == 'engine' and reports.FOREIGN == 'reports'\n"
        "from autotune.engine.config import ModelConfig\n"
        "from autotune.engine.model import build_model\n"
        "from autotune import kernels as ours\n"
        "assert hasattr(ours, 'rms_norm') and ours is not kernels\n"
        "build_model(ModelConfig(), device='meta')\n"
        "from autotune.cli import main\n"
        "raise SystemExit(main(['estimate', 'plan.precision=bf16', 'plan.kernels=torch']))\n"
    )
    # cwd first on sys.path: the foreign packages shadow any top-level name the project might use
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tokens/s" in run.stdout
