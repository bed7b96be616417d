"""Site addresses: `:input` only on real module names; raw final modules are terminal sites (flagged trivial)."""

from __future__ import annotations

import numpy as np
import pytest

from clap.errors import ClapError

from .conftest import small_study


# regression (review): `:input` on aliases is refused
def test_aliases_refuse_input_suffix(tiny_gpt2):
    for address in ("embed:input", "unembed:input", "layers[1].mlp:input"):
        with pytest.raises(ClapError, match="`:input` applies to real module names"):
            small_study(tiny_gpt2, sites=[address]).run()


# regression (review): terminal sites drive the trivial flag, also when given as raw module names
def test_raw_final_modules_are_flagged_trivial(tiny_llama):
    frame = small_study(tiny_llama, sites=["lm_head:input", "model.norm:input", "model.layers.2"],
                        positions=["last"]).run()
    assert frame.trivial.all()
    np.testing.assert_allclose(frame.recovery.to_numpy(), 1.0, atol=1e-4)
