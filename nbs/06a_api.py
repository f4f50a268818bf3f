# %%
#| default_exp __init__

# %%
#| export
import importlib, importlib.metadata

# %%
#| hide
from fastcore.test import test_eq, test_fail

# %% [markdown]
# # The public API
#
# > jigsaw_ref, a literate reference implementation of WeatherMixer and Jigsaw: the handful of names a training loop of your own needs, importable from the package itself.

# %% [markdown]
# `import jigsaw_ref` gives these names; each lives in the module that defines it (and is documented there),
# and is imported only when first used, so `import jigsaw_ref` stays light and `jigsaw_ref.config` still
# imports nothing but the standard library.
#
# | what you need | name | module |
# |---|---|---|
# | a model configuration | `MixerConfig`, `preset`, `PRESETS` | `config` |
# | the layout and this rank's groups | `Grid`, `make_groups`, `local_device`, `init_torch_distributed` | `grid`, `comm` |
# | ranks inside one process (notebooks, tests) | `run_ranks` | `ranks` |
# | the models | `WeatherMixer` (one process), `JigsawMixer` (this rank's share) | `mixer`, `parallel` |
# | this rank's block of a full tensor, and back | `block_of`, `scatter_state`, `gather_state` | `parallel` |
# | the loss share and its denominator | `loss_share`, `loss_count`, `lat_weights_cos`, `lat_weights_area`, `variable_weights` | `parallel`, `loss` |
# | what to do between `backward()` and `step()` | `complete_grads` (replicas, data parallelism, clipping), `JigsawMixer.guard` | `parallel` |
# | data, each rank reading only its block | `Era5Dataset` | `data` |
# | forecasts of a checkpoint in the WeatherBench2 layout (xarray) | `forecast` | `forecast` |
#
# The tutorial `24_tutorial_own_loop` trains 2-way and 4-way with `torch.optim.Adam` using only these.

# %%
#| export
try: __version__ = importlib.metadata.version("jigsaw_ref")  # from settings.ini, through the installed package
except importlib.metadata.PackageNotFoundError: __version__ = "0+unknown"

_API = {"MixerConfig": "config", "preset": "config", "PRESETS": "config", "Grid": "grid", "make_groups": "comm",
        "local_device": "comm", "init_torch_distributed": "comm", "run_ranks": "ranks", "WeatherMixer": "mixer",
        "JigsawMixer": "parallel", "block_of": "parallel", "scatter_state": "parallel", "gather_state": "parallel",
        "loss_share": "parallel", "loss_count": "parallel", "complete_grads": "parallel", "lat_weights_cos": "loss",
        "lat_weights_area": "loss", "variable_weights": "loss", "Era5Dataset": "data",
        "forecast": "forecast"}
__all__ = list(_API)


def __getattr__(name: str):
    "The public name `name`, imported from its module on first use (PEP 562)."
    if name not in _API: raise AttributeError(f"module 'jigsaw_ref' has no attribute {name!r}; the public names are {__all__}")
    return getattr(importlib.import_module(f"jigsaw_ref.{_API[name]}"), name)

# %%
import jigsaw_ref
from jigsaw_ref.parallel import JigsawMixer
assert jigsaw_ref.JigsawMixer is JigsawMixer
test_eq(sorted(jigsaw_ref.__all__), sorted(_API))
test_fail(lambda: jigsaw_ref.Trainer, contains="the public names are")
for _n in jigsaw_ref.__all__: getattr(jigsaw_ref, _n)  # every public name resolves
