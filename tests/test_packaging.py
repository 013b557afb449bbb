"""The distribution's layout, its console script, and the README's set-up commands."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The bash code blocks above the README's first section."""
    intro = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", intro, flags=re.S)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("cumo_mlx-*.whl")
    return zipfile.ZipFile(path)


@pytest.fixture(scope="module")
def wheel_files(wheel) -> list[str]:
    return wheel.namelist()


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(member).decode()


def test_wheel_ships_convert_and_cli_inside_the_package(wheel_files):
    assert "cumo_mlx/convert/__init__.py" in wheel_files
    assert "cumo_mlx/cli/main.py" in wheel_files
    top_level = {name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"cumo_mlx"}, f"unexpected top-level entries: {top_level}"


def test_wheel_ships_every_subpackage_and_no_research_code(wheel_files):
    """The product only: the demo recipe, its probes and the benchmarks stay in the repository."""
    for package in ("models", "train", "batch", "serve", "eval", "convert", "cli"):
        assert f"cumo_mlx/{package}/__init__.py" in wheel_files, package
    assert "cumo_mlx/serve/static/index.html" in wheel_files
    research = ("demo_model", "demo_config", "vision_pretraining", "binding_probe", "lookup_probe", "recipe", "harness")
    shipped = {Path(name).stem for name in wheel_files if name.endswith(".py")}
    assert not shipped & set(research), shipped & set(research)
    top_modules = [name for name in wheel_files if name.count("/") == 1 and name.endswith(".py")]
    assert len(top_modules) <= 14, top_modules  # the package's top level stays small: subpackages hold the rest


def test_wheel_declares_console_script_and_platform_mlx(wheel):
    assert "cumo-mlx = cumo_mlx.cli.main:entry_point" in dist_info(wheel, "entry_points.txt")
    requires = [line for line in dist_info(wheel, "METADATA").splitlines() if line.startswith("Requires-Dist: mlx")]
    assert any(r.startswith("Requires-Dist: mlx[cpu]") and 'sys_platform == "linux"' in r for r in requires)
    assert any(r.startswith("Requires-Dist: mlx<") or r.startswith("Requires-Dist: mlx>") for r in requires if "darwin" in r)
    assert any("mlx[cuda12]" in r and 'extra == "cuda"' in r for r in requires)
    assert not any(r.startswith("Requires-Dist: torch") and "extra" not in r for r in dist_info(wheel, "METADATA").splitlines())


def test_console_script_runs():
    result = subprocess.run(["cumo-mlx", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("generate", "chat", "convert", "train", "upcycle", "fuse", "data", "experts"):
        assert command in result.stdout


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    install_and_demo, run_tests = readme_commands()
    assert "--model demo" in install_and_demo and "examples/" in install_and_demo
    assert "pytest" in run_tests
    assert run_tests in (ROOT / ".ci" / "run").read_text()


def test_readme_demo_image_is_bundled():
    install_and_demo, _ = readme_commands()
    image = re.search(r"--image (\S+)", install_and_demo).group(1)
    assert (ROOT / image).is_file()
