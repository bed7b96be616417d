"""Device strings are checked before a model loads: clear errors naming the setting, not torch tracebacks."""

import pytest
import torch

from clap.devices import resolve_device
from clap.errors import ClapError


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("text,expected", [("gpu", "is not a device"), ("cpux", "did you mean 'cpu'"),
                                           ("", "is not a device")])
def test_bad_device_strings_name_the_setting(text, expected):
    with pytest.raises(ClapError, match=expected) as err:
        resolve_device(text, where="execution.device")
    assert str(err.value).startswith("execution.device:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("text", ["cuda", "cuda:7"])
def test_cuda_without_cuda_is_refused(text):
    with pytest.raises(ClapError, match="no CUDA device is available"):
        resolve_device(text, where="--device")
