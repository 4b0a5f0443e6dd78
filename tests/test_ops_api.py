"""The functional API's own behaviour, across backends: argument forms and gradient plumbing."""

import pytest
import torch

import fastnin


def test_int_and_pair_arguments_agree():
    x = torch.randn(1, 2, 7, 6)
    w = [torch.randn(3, 2, 3, 3)]
    a = fastnin.mlpconv(x, w, None, 2, 1)
    b = fastnin.mlpconv(x, w, [None], (2, 2), [1, 1])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad,msg", [
    (dict(stride=(1, 1, 1)), "stride must be an int or a pair"),
    (dict(stride=1.5), "stride must be an int or a pair"),
    (dict(padding=True), "padding must be an int or a pair"),
    (dict(weights=torch.randn(3, 2, 3, 3)), "weights must be a list"),
    (dict(biases=torch.randn(3)), "biases must be a list"),
])
def test_malformed_argument_forms(bad, msg):
    args = dict(x=torch.randn(1, 2, 7, 6), weights=[torch.randn(3, 2, 3, 3)], biases=None, stride=1, padding=0)
    args.update(bad)
    with pytest.raises(ValueError, match=msg):
        fastnin.mlpconv(**args)
