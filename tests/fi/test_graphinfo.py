"""GraphInfo's view of a graph: readers of Identity(constant) read the constant."""

from __future__ import annotations

import numpy as np
import pytest

from harden.fi.graphinfo import GraphInfo
from harden.fi.sites import list_sites
from harden.graph.ort import make_session
from tests.fi.test_engine_paths import _weight_check
from tests.fi.tiny_models import (conv_classifier_cnn, identity_weight_cnn, labelled_inputs, reshaped_weight_mlp,
                                  tied_cnn)


def test_identities_of_constants_are_bypassed_and_the_graph_computes_the_same() -> None:
    model = identity_weight_cnn()
    x, _ = labelled_inputs(model, 5)
    info = GraphInfo(model, example=x[:1])
    assert [n.name for n in info.nodes if n.op_type == "Identity"] == ["out"]  # a graph output stays
    conv, fc = info.nodes[info.node_index["conv"]], info.nodes[info.node_index["fc"]]
    assert conv.input[1] == "w0" and fc.input[1] == "wf0"
    assert "w0" in info.constants and "w" not in info.tensors
    before = make_session(model, opt_level="disable").run(None, {"x": x})[0]
    after = make_session(info.model, opt_level="disable").run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)
    assert [n.op_type for n in tied_cnn().graph.node].count("Identity") == 1
    assert not [n for n in GraphInfo(tied_cnn()).nodes if n.op_type == "Identity"]


def test_a_weight_read_only_through_an_identity_is_a_site() -> None:
    """Before, such a weight was missing from the site list, so a 'whole-network' campaign left it out."""
    sites = {s.name: s for s in list_sites(identity_weight_cnn()) if s.kind == "weight"}
    assert sorted(sites) == ["b", "bf", "w0", "wf0"]
    assert sites["w0"].node == "conv" and not sites["w0"].shared and sites["wf0"].node == "fc"


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
@pytest.mark.parametrize("name", ["w0", "wf0"])
def test_faults_in_a_weight_behind_an_identity_match_the_reference(name: str, cone: bool) -> None:
    """The fast weight path on the bypassed graph equals a changed initializer in the user's own model."""
    _weight_check(identity_weight_cnn(), name, seed=2, cone=cone)


def test_scores_of_a_1x1_conv_classifier_are_read_as_n_by_c() -> None:
    """The model zoo's SqueezeNet and DenseNet-121 end in N×1000×1×1 scores; these were refused before."""
    model = conv_classifier_cnn(classes=5)
    before = model.SerializeToString()
    x, _ = labelled_inputs(model, 3)
    info = GraphInfo(model, example=x[:1])
    assert model.SerializeToString() == before  # the analysis works on its own copy
    assert info.classes == 5 and info.tensors[info.scores].shape == (1, 5) and info.scores != "logits"
    scores = make_session(info.model, opt_level="disable").run([info.scores], {"x": x})[0]
    np.testing.assert_array_equal(scores, _plain(model, x).reshape(3, 5))
    # the added Flatten is no fault site; the model's own 4-D output still is one
    everything = {s.tensor for s in list_sites(info, include_all_tensors=True)}
    assert info.scores not in everything and {"logits", "cls", "c1"} <= everything
    assert [s.name for s in list_sites(info) if s.kind == "activation"] == ["c1", "cls"]


def _plain(model, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return make_session(model, opt_level="disable").run(None, {"x": x})[0]


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
def test_a_weight_stored_flat_and_reshaped_is_a_site_under_its_own_name(cone: bool) -> None:
    """caffe2-era zoo graphs reshape their classifier weight on every run: it was missing from the sites."""
    model = reshaped_weight_mlp()
    sites = {s.name: s for s in list_sites(model) if s.kind == "weight"}
    assert sorted(sites) == ["b0", "bf", "w0", "wf_flat"] and sites["wf_flat"].shape == (3, 6)
    _weight_check(model, "wf_flat", seed=3, cone=cone)  # against a changed element of the flat stored tensor
