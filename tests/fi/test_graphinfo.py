"""GraphInfo's view of a graph: readers of Identity(constant) read the constant."""

from __future__ import annotations

import numpy as np
import pytest

from harden.fi.graphinfo import GraphInfo
from harden.fi.sites import list_sites
from harden.graph.ort import make_session
from tests.fi.test_engine_paths import _weight_check
from tests.fi.tiny_models import identity_weight_cnn, labelled_inputs, tied_cnn


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
