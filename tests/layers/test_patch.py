"""layers/patch.py on plain modules: the filter takes the caller's selection predicate (the layers never read the
config), `find` leaves MoE routers out, `swap` replaces one module at a time and reports what it did, and what
stays in high precision is named and counted. Through prep_model and DeepSpeed's classes: tests/test_prepare.py,
tests/layers/test_linear.py."""

import functools

from torch import nn

from ds_quant.config import QuantConfig
from ds_quant.layers import patch


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.conv = nn.Conv2d(2, 2, 3)


class Moe(nn.Module):
    """transformers 4.x's layout: a router nn.Linear with one output per expert beside an `experts` ModuleList."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))


def test_the_filter_asks_the_callers_predicate_with_the_type_names_a_list_knows_a_module_by():
    asked = []

    def selects(types, name):
        asked.append((sorted(types), name))
        return name.endswith("up")

    model = nn.Sequential(Block())
    found = patch.find(model, patch.make_filter(selects))
    assert [n for n, _ in found] == ["0.up"]
    assert (["Linear"], "0.up") in asked and (["Linear"], "0.down") in asked
    assert not any(name.endswith("conv") for _, name in asked)  # not a linear: never asked


def test_the_config_rule_plugs_in_as_the_predicate():
    cfg = QuantConfig.from_dict({"method": "HOOKS", "blocklist": {"names": ["down"]}})
    found = patch.find(nn.Sequential(Block()), patch.make_filter(functools.partial(cfg.selects, "linear")))
    assert [n for n, _ in found] == ["0.up"]


def test_routers_are_never_found_and_are_named_as_kept():
    model = nn.Sequential(Moe())
    assert patch.routers(model) == {"0.gate"}
    found = {n for n, _ in patch.find(model, patch.make_filter(lambda types, name: True))}
    assert "0.gate" not in found and "0.experts.0" in found
    assert ("0.gate", "Linear", patch.ROUTER_REASON) in patch.skipped_tp_layers(model)


def test_swap_replaces_in_place_and_reports_each_module():
    model = nn.Sequential(Block())
    targets = patch.find(model, patch.make_filter(lambda types, name: True))
    out, report = patch.swap(model, targets, lambda m, fqn: nn.Identity())
    assert out is model and isinstance(model[0].up, nn.Identity) and isinstance(model[0].down, nn.Identity)
    assert [(r.name, r.old_type, r.new_type) for r in report] == [("0.up", "Linear", "Identity"),
                                                                  ("0.down", "Linear", "Identity")]
    assert "count: 2 Linear -> Identity" in patch.format_report(report)
    whole, report = patch.swap(nn.Linear(4, 4), [("", nn.Linear(4, 4))], lambda m, fqn: nn.Identity())
    assert isinstance(whole, nn.Identity) and report[0].name == ""  # a model that is itself the target


def test_what_stays_in_high_precision_is_named_and_counted():
    skipped = patch.skipped_tp_layers(nn.Sequential(Block()))
    assert [(n, c) for n, c, _ in skipped] == [("0.conv", "Conv2d")]
    assert "a convolution, not quantized by ds_quant" in skipped[0][2]
    assert patch.format_skipped(skipped + [("x", "Foo", "r")]) == "2 layer(s): 1 Conv2d, 1 Foo"


def test_tp_position_of_a_model_without_tp_layers_is_rank_0_of_1():
    assert patch.tp_position([]) == (0, 1, None)
    rank, world, _ = patch.model_tp(nn.Sequential(nn.Linear(4, 4)))
    assert (rank, world) == (0, 1)
