"""weights_map/ ships inside the wheel: build it, install it into a fresh venv, load a model from there.

The fresh venv sees this interpreter's installed packages (torch, ...) through a .pth file listing this
interpreter's own site-packages folders, whether the tests run in a venv or not (`system_site_packages=True` would
give the *base* interpreter's packages, which lack torch when the tests run inside a venv). minibt itself comes
only from the wheel: the venv's own site-packages come first on sys.path, and PYTHONPATH is not passed on.
"""
import os
import site
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_weights_maps_and_loads(tiny, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("minibt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"minibt/weights_map/bert.toml", "minibt/weights_map/roberta.toml", "minibt/__main__.py"} <= set(names)
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    inner = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip())
    outer = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (inner / "_outer_site.pth").write_text("\n".join(p for p in outer if os.path.isdir(p)) + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=600, env=clean)
    folder, _ = tiny("RobertaForMaskedLM")
    code = "import minibt, sys; m = minibt.from_hub(sys.argv[1]); print(minibt.__file__, m.head, minibt.__version__)"
    r = subprocess.run([py, "-c", code, str(folder)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env=clean)
    assert r.returncode == 0, r.stderr
    where, head, version = r.stdout.split()
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert where.startswith(str(inner)) and head == "masked-lm" and version == want
    r = subprocess.run([env / "bin" / "minibt", "--version"], capture_output=True, text=True, timeout=60, env=clean)
    assert r.returncode == 0 and r.stdout.strip() == f"minibt {want}", r.stderr
