"""The plan as data: blocks, vote targets, stitching and composition dependencies for odd ranges."""

from __future__ import annotations

import pytest

from seamless_core.config import parse_config
from seamless_core.errors import InputError
from seamless_core.plan import Plan, build_plan, decay_weight, split_blocks, topological, vote_targets


def config(**overrides):
    base = {"source": "file:///data/src", "destination": "file:///data/out", "sections": {"start": 0, "stop": 13},
            "blocks": {"size": 4, "decay_dist": 100}}
    base.update(overrides)
    return parse_config(base)


def deps_of(plan: Plan, step_id: str) -> set[str]:
    return set(plan.by_id[step_id].deps)


def upstream(plan: Plan, step_id: str) -> set[str]:
    """Every step that `step_id` waits for, directly or through others."""
    seen: set[str] = set()
    todo = list(plan.by_id[step_id].deps)
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo.extend(plan.by_id[dep].deps)
    return seen


def test_blocks_overlap_by_one_section_and_cover_the_range() -> None:
    blocks = split_blocks(0, 13, 4)
    assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 8), (8, 12)]
    assert split_blocks(0, 14, 4)[-1].stop == 13  # a last block of one new section
    assert [(b.start, b.stop) for b in split_blocks(5, 8, 10)] == [(5, 7)]  # shorter than a block
    assert split_blocks(3, 4, 10) == []  # one section: the anchor alone


def test_bad_sections_never_start_a_block_nor_serve_as_targets() -> None:
    blocks = split_blocks(0, 13, 4, bad=[4, 8])
    assert [(b.start, b.stop) for b in blocks] == [(0, 5), (5, 9), (9, 12)]
    assert vote_targets(7, blocks[1], 3, {6}) == [5]  # 6 is bad: only 5 remains (odd count)
    assert split_blocks(0, 5, 4, bad=[0, 1]) [0].start == 2  # a bad range start moves the anchor


def test_vote_targets_are_odd_and_limited_to_the_block() -> None:
    block = split_blocks(10, 30, 10)[1]  # 20..29
    assert vote_targets(21, block, 5, set()) == [20]
    assert vote_targets(22, block, 5, set()) == [21]  # two available: the nearest one (strict majority)
    assert vote_targets(23, block, 5, set()) == [22, 21, 20]
    assert vote_targets(29, block, 5, set()) == [28, 27, 26, 25, 24]
    assert vote_targets(29, block, 15, set()) == list(range(28, 19, -1))  # K larger than available


def test_section_chain_dependencies() -> None:
    plan = build_plan(config())
    # section 7 in block 1 (4..8) votes over 6, 5, 4: each compute_field waits for its target's render
    assert deps_of(plan, "z7.t1.compute_field") == {"b001.z6.render"}
    assert deps_of(plan, "z7.t3.compute_field") == {"b001.z4.start"}
    assert plan.by_id["b001.z4.start"].args[0] == "copy"
    assert deps_of(plan, "z7.vote") == {"z7.t1.compute_field", "z7.t2.compute_field", "z7.t3.compute_field"}
    # the render fills its holes from the block's section before it: the vote already waits for that one
    assert deps_of(plan, "b001.z7.render") == {"z7.vote"}
    assert "b001.z6.render" in upstream(plan, "b001.z7.render")
    args = list(plan.by_id["b001.z7.render"].args)
    assert args[args.index("--fill-holes-from") + 1] == "6"
    assert "b001.z8.render" not in plan.by_id  # a block's last section is no target inside it
    # the odd blocks write the odd layer, so the shared section never clashes
    assert "blocks/odd" in " ".join(plan.by_id["b001.z5.render"].args)
    assert "blocks/even" in " ".join(plan.by_id["b002.z9.render"].args)


def test_filled_targets_skip_bad_sections_and_can_be_turned_off() -> None:
    plan = build_plan(config(bad_sections=[6]))
    args = list(plan.by_id["b001.z7.render"].args)
    assert args[args.index("--fill-holes-from") + 1] == "5"  # 6 is bad: never rendered, never a source
    assert "b001.z5.render" in upstream(plan, "b001.z7.render")
    for overrides in ({}, {"vote": {"k": 1}}, {"bad_sections": [4, 5, 9]}, {"sections": {"start": 3, "stop": 6}}):
        plan = build_plan(config(**overrides))
        for step in (s for s in plan.steps if s.kind == "block_render"):
            source = int(step.args[step.args.index("--fill-holes-from") + 1])
            writers = {f"b{step.block:03d}.z{source}.render", f"b{step.block:03d}.z{source}.start"}
            assert writers & upstream(plan, step.id), (overrides, step.id)  # rendered before it is read
    plain = build_plan(config(blocks={"size": 4, "decay_dist": 100, "fill_targets": False}))
    assert not any("--fill-holes-from" in step.args for step in plain.steps)


def test_stitching_waits_for_the_previous_block_and_compose_applies_decay() -> None:
    plan = build_plan(config())
    assert deps_of(plan, "b002.stitch") == {"z8.vote"}
    assert "b000.stitch" not in plan.by_id
    compose = plan.by_id["z10.compose"]
    assert set(compose.deps) == {"b001.stitch", "b002.stitch", "z10.vote"}
    args = list(compose.args)
    weights = [float(args[i + 1]) for i, a in enumerate(args) if a == "--weight"]
    assert weights == [pytest.approx(decay_weight(10, 4, 100)), pytest.approx(decay_weight(10, 8, 100)), 1.0]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--at"] == ["4", "8", "10"]
    assert plan.by_id["z0.compose"].deps == () and "--like" in plan.by_id["z0.compose"].args


def test_decay_drops_stitches_further_than_decay_dist() -> None:
    plan = build_plan(config(sections={"start": 0, "stop": 30}, blocks={"size": 4, "decay_dist": 6}))
    args = list(plan.by_id["z29.compose"].args)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--at"] == ["24", "28", "29"]  # 4..20 faded out


def test_stage_granularity_chains_one_step_per_mip() -> None:
    plan = build_plan(config(granularity="stage", stages="exact"))
    assert [plan.by_id[f"z7.t1.m{m}.compute_field"].mip for m in (2, 1, 0)] == [2, 1, 0]
    assert deps_of(plan, "z7.t1.m1.compute_field") == {"z7.t1.m2.compute_field", "b001.z6.render"}
    assert "--stage-range" in plan.by_id["z7.t1.m1.compute_field"].args
    assert plan.by_id["z7.t1.m1.compute_field"].label == "z=7 mip=1 compute_field t1"


def test_every_dependency_exists_and_order_is_valid_for_odd_ranges() -> None:
    for overrides in ({}, {"sections": {"start": 3, "stop": 4}}, {"sections": {"start": 0, "stop": 2}},
                      {"bad_sections": [0, 4, 5]}, {"vote": {"k": 9}}, {"granularity": "stage"}):
        plan = build_plan(config(**overrides))
        ids = {s.id for s in plan.steps}
        assert len(ids) == len(plan.steps)
        assert all(d in ids for s in plan.steps for d in s.deps)
        assert [s.id for s in topological(plan.steps)] and {s.z for s in plan.steps if s.kind == "render"} == set(
            range(plan.config.sections.start, plan.config.sections.stop))
        for step in plan.steps:  # argv carries the markers of exactly the steps it waits for
            argv = plan.argv(step)
            assert argv.count("--upstream") == len(step.deps) and argv[0] == "--marker"


def test_priorities_put_the_block_chain_first() -> None:
    plan = build_plan(config())
    priority = plan.priorities()
    assert priority["b000.z0.start"] > priority["z1.cpc_source"]
    assert priority["z1.t1.compute_field"] > priority["z1.compose"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"blocks": {"size": 1}}, "blocks.size"),
    ({"sections": {"start": 5, "stop": 5}}, "must be greater than start"),
    ({"vote": {"k": 4}}, "k must be odd"),
    ({"stages": "fastest"}, "unknown stage preset"),
    ({"stages": [{"mip": 0, "estimators": [{"name": "finetuner"}]}, {"mip": 2, "estimators": [{"name": "finetuner"}]}]}, "coarse to fine"),
    ({"stages": [{"mip": 1, "estimators": [{"name": "magic"}]}]}, "unknown estimator"),
    ({"destination": "file:///data/src"}, "destination must not be the source"),
    ({"destination": "ftp://host/out"}, "unsupported storage scheme"),
    ({"blocks": {"size": 4, "decay": 3}}, "blocks.decay: unknown key"),
    ({"sourse": "x"}, "sourse: unknown key"),
    ({"bad_sections": [40]}, "outside sections"),
    ({"render": {"mip": 3}}, "coarser than the finest stage"),
])
def test_config_errors_name_the_key_and_the_fix(overrides, message) -> None:
    with pytest.raises(InputError) as caught:
        config(**overrides)
    assert message in str(caught.value)
