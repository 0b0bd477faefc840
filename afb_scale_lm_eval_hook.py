"""Makes the stock `lm_eval --model afb_scale ...` command know the name `afb_scale`.

lm-eval 0.4 discovers no plugins: its model registry holds only what `lm_eval.models` lists
(as lazy "module:attr" placeholders) and what has been imported. So `pip install` puts a one-line
`afb_scale_lm_eval.pth` into site-packages (setup.py writes it) that runs `install()` below at
every interpreter start-up. `install()` puts a finder at the front of `sys.meta_path` that
ignores every import but `lm_eval.models`; when that module has run (lm_eval imports it on its
first model look-up, `lm_eval.api.registry.get_model`), the finder adds the lazy placeholder
`afb_scale` -> `afb_scale.evaluation.lm_eval_model:AfbScaleLM`, which lm_eval itself imports only
when `--model afb_scale` is asked for.

This runs in every Python process of the environment, so it imports nothing (no torch, no
afb_scale): start-up pays for defining one class, and each later import for one string compare.
It lives outside the afb_scale package because importing a module of a package runs the
package's __init__ first.
"""

import sys

_TRIGGER = "lm_eval.models"  # runs lm_eval's own registrations (models/__init__.py)
_ALIAS = "afb_scale"
_TARGET = "afb_scale.evaluation.lm_eval_model:AfbScaleLM"


def _register() -> None:
    from lm_eval.api.registry import model_registry

    # Importing afb_scale.evaluation.lm_eval_model first registers the class itself; lm_eval
    # refuses a second, different target for a name, so leave that one alone.
    if _ALIAS not in model_registry:
        model_registry.register(_ALIAS, target=_TARGET)


class _RegisterAfterLoad:
    """The real loader of lm_eval.models, then the registration."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _register()
        except Exception as e:  # never break lm_eval over our name (e.g. a registry API change)
            print(f"warning: afb_scale could not register its lm_eval model: {e}", file=sys.stderr)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_source, ...
        return getattr(self._loader, name)


class LmEvalModelFinder:
    """A meta-path finder that answers only for lm_eval.models, wrapping the real finder's spec."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


def install() -> None:
    if LmEvalModelFinder not in sys.meta_path:
        sys.meta_path.insert(0, LmEvalModelFinder)
