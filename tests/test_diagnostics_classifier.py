"""The classifier check: convert warns when the last layer gets fewer bits than classifier_bits(C)."""

import warnings

import pytest
from torch import nn

import lowprec as lp
from lowprec.models import build_model


def test_warns_naming_the_layer_the_bits_and_the_fix():
    with pytest.warns(UserWarning, match=r"'classifier\.3' scores 10 classes.*6 bits.*weight=dfx<4>.*"
                                         r"fix: classifier_rule=on, or an override '@last: weight=dfx<6>"):
        lp.convert(build_model("lenet"), "params=dfx<4>,activations=dfx<4>,grads=dfx<4>")
    head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1000))
    with pytest.warns(UserWarning, match=r"1000 classes.*12 bits.*output_grad=dfx<8>"):
        lp.convert(head, "params=int8,activations=int8,grads=int8")  # Park's rule off: INT8 < 12 bits
    with pytest.warns(UserWarning, match=r"fix: an override '@last: weight=uniform<6>"):
        lp.convert(build_model("lenet"), "weight=uniform<4>,classifier_rule=on")  # the rule cannot widen uniform


@pytest.mark.parametrize("policy", ["fp32", "mixed-fp16", "int8", "int8-lazy", "wrpn-4-4", "dfx-10-12",
                                    "params=dfx<4>,activations=dfx<4>,grads=dfx<4>,classifier_rule=on",
                                    "params=dfx<4>,grads=dfx<4>; @last: params=dfx<6>,output=dfx<6>,grads=dfx<6>"])
def test_silent_when_the_classifier_has_enough_bits(policy):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.convert(build_model("lenet"), policy)
