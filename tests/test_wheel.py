"""weights_map/ ships inside the wheel: build it, install it into a fresh venv, load a model from there."""
import subprocess
import sys
import venv


def test_wheel_carries_weights_maps_and_loads(tiny, tmp_path):
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(root)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("minibt-*.whl"))
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert {"minibt/weights_map/bert.toml", "minibt/weights_map/roberta.toml"} <= set(names)
    env = tmp_path / "venv"
    venv.create(env, system_site_packages=True, with_pip=True)   # torch etc. from this machine, minibt from the wheel
    py = env / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    folder, _ = tiny("RobertaForMaskedLM")
    code = ("import minibt, sys; m = minibt.from_hub(sys.argv[1]); "
            "print(minibt.__file__); print(m.head)")
    r = subprocess.run([py, "-c", code, str(folder)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    where, head = r.stdout.split()
    assert str(env) in where and head == "masked-lm"
