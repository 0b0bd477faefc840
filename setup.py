"""Build hooks that pyproject.toml cannot express: the lm_eval start-up hook's .pth file.

`afb_scale_lm_eval.pth` (one line, run by site.py at interpreter start-up) installs the finder in
afb_scale_lm_eval_hook.py, so that the stock `lm_eval --model afb_scale` finds our model (lm-eval
0.4 reads no entry points for models). A .pth only works at the top of site-packages, which no
pyproject setting reaches, so:
- a regular wheel (`pip install .`): build_py writes it at the top of build_lib, which becomes
  the top of the wheel;
- an editable install (`pip install -e .`, PEP 660, what launch/setup.sh does): setuptools builds
  the editable wheel without build_lib's files, so editable_wheel adds it to the finished wheel
  (with its RECORD line, so that pip uninstall removes it too).
Everything else is in pyproject.toml.
"""

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "afb_scale_lm_eval.pth"
# site.py executes a .pth line only if it starts with "import".
PTH_TEXT = "import afb_scale_lm_eval_hook; afb_scale_lm_eval_hook.install()\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            Path(self.build_lib, PTH_NAME).write_text(PTH_TEXT)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH_NAME)]


def _add_to_wheel(wheel: Path, name: str, text: str) -> None:
    """Rewrite `wheel` with the file `name` at its top and a RECORD line for it."""
    data = text.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record_line = f"{name},sha256={digest},{len(data)}\n".encode()
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dst.writestr(name, data)
        for item in src.infolist():
            payload = src.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                payload += record_line
            dst.writestr(item, payload)
    tmp.replace(wheel)


class EditableWheelWithPth(editable_wheel):
    def run(self):
        super().run()
        for wheel in Path(self.dist_dir).glob("*.editable-*.whl"):
            _add_to_wheel(wheel, PTH_NAME, PTH_TEXT)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
