"""The alignment workflow as data: config + section range -> steps with explicit dependencies.

No executor lives here. Every step is the argument list of one `seamless` subcommand plus the ids of
the steps it waits for, so the local executor (`seamless align`) and the Airflow DAG run exactly the
same commands, in the same order, with the same restart markers.

The shape (docs/workflow.md has the picture):

* the range splits into blocks of `blocks.size` sections that overlap by one; block b starts at
  section s_b (a copy of the source: its field is the identity) and aligns s_b+1 .. s_b+1 serially,
  each section onto up to `vote.k` already aligned sections before it in the same block;
* per section: compute_field for each target (one step per target, or per target and MIP stage),
  vector_vote, and render into the block's image layer (even/odd blocks alternate layers, so the
  overlap section is written by two blocks without a clash), its black pixels filled from the block's
  previous good section so a target's holes do not steer later fields (`blocks.fill_targets`);
* stitching: block b's start section was also aligned by block b-1; that voted field is block b's
  stitch field (block b's frame -> block b-1's frame);
* compose with decay: each section's final field is its block field composed under the stitch fields
  of its block and the blocks before it, each scaled by max(0, 1 - (z - s_j) / decay_dist);
* final render at `render.mip` with mask blackout and its MIP pyramid (`--downsample-to`: one task, not two),
  and CPC before and after.

Tasks (`Plan.tasks`): what an orchestrator starts as one unit. With `fuse: none` a task is one step. On
the sample a step computes for well under a second while a task start (an Airflow task runner plus a
`python -m seamless_core` child importing torch, or a pod) costs seconds, so `fuse: section` runs a
section's serial chain (its compute_fields, vote and block render) as one task and its final steps
(compose, render, CPC of the source) as another, and `fuse: block` does the same per block. A fused task
is one `seamless` command line: the steps' own command lines joined by `--then`, each still with its own
restart marker, so a retried task skips the steps it already finished and both executors leave the same
markers. `fuse: pairs` (the default) joins only what runs back to back anyway: a vote and the block render
that follows it, a compose and the final render that follows it, and a block's CPC maps (cheap, off
every critical path): 5.2 tasks a section instead of 8.7, every compute_field still its own task.
Fusing never joins steps that could run in parallel across sections or blocks: the blocks'
chains stay independent, a stitch runs at the end of the chain that votes it, and the CPC of a block's
first section (it needs the previous block's render) is a task of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

from .config import ProjectConfig
from .estimators.spec import StagesSpec


@dataclass(frozen=True)
class Layout:
    """Where every output of a run lives under the destination (documented in docs/layout.md)."""

    destination: str

    def _at(self, name: str) -> str:
        return f"{self.destination.rstrip('/')}/{name}"

    @property
    def image(self) -> str:
        return self._at("image")

    @property
    def cpc(self) -> str:
        return self._at("cpc")

    @property
    def cpc_source(self) -> str:
        return self._at("cpc_source")

    def block_image(self, block: int) -> str:
        return self._at("blocks/even" if block % 2 == 0 else "blocks/odd")

    def target_field(self, rank: int) -> str:
        return self._at(f"fields/target_{rank}")

    @property
    def voted(self) -> str:
        return self._at("fields/voted")

    @property
    def agreement(self) -> str:
        return self._at("fields/agreement")

    @property
    def stitch(self) -> str:
        return self._at("fields/stitch")

    @property
    def final_field(self) -> str:
        return self._at("fields/final")

    @property
    def markers(self) -> str:
        return self._at(".seamless/steps")

    def marker(self, step_id: str) -> str:
        return f"{self.markers}/{step_id}.json"


def compose_step(z: int) -> str:
    """The id of section z's compose step (its marker keeps the report `seamless report` reads folds from)."""
    return f"z{z}.compose"


@dataclass(frozen=True)
class Block:
    index: int
    start: int  # aligned to nothing in this block: a copy of the source (identity field)
    stop: int  # last section, inclusive; it is the next block's start

    @property
    def sections(self) -> range:
        """Sections this block computes a field for (its start excluded)."""
        return range(self.start + 1, self.stop + 1)


@dataclass(frozen=True)
class Step:
    """One `seamless` command and the steps it waits for."""

    id: str  # stable and filesystem/Airflow safe: also the marker name and the Airflow task id
    kind: str  # compute_field, vote, block_start, block_render, stitch, compose, render, cpc, cpc_source
    args: tuple[str, ...]  # the `seamless` subcommand and its options, no marker options
    deps: tuple[str, ...] = ()
    z: int | None = None
    mip: int | None = None
    block: int | None = None
    gpu: bool = False  # whether the step gains from a GPU (field estimation, voting, rendering)

    @property
    def label(self) -> str:
        """What the Airflow grid and the executor's log show, e.g. `z=12 mip=2 compute_field t1`."""
        parts = [f"z={self.z}" if self.z is not None else "", f"mip={self.mip}" if self.mip is not None else "", self.kind]
        if self.kind == "compute_field":
            parts += [p for p in self.id.split(".") if p.startswith("t") and p[1:].isdigit()]
        return " ".join(p for p in parts if p)


THEN = "--then"  # joins the command lines of a fused task's steps: `seamless A --then B` runs A, then B


@dataclass(frozen=True)
class Task:
    """Steps an orchestrator runs as one unit (one Airflow task, one pod), in order, in one process."""

    id: str  # the step id when the task is one step; else e.g. `z12.chain`, `b001.final`, `b001.cpc`
    kind: str  # the step's kind when one step; else chain, final or cpc
    steps: tuple[str, ...]  # step ids, in a valid order
    deps: tuple[str, ...] = ()  # task ids
    label: str = ""
    z: int | None = None  # the section the task's link opens (the first one of a block's)
    block: int | None = None
    gpu: bool = False


@dataclass(frozen=True)
class Plan:
    config: ProjectConfig
    layout: Layout
    blocks: tuple[Block, ...]
    steps: tuple[Step, ...]
    by_id: dict[str, Step] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id.update({s.id: s for s in self.steps})

    def argv(self, step: Step) -> list[str]:
        """The full command line: restart-marker options, then the step's own subcommand."""
        argv = ["--marker", self.layout.marker(step.id)]
        for dep in step.deps:
            argv += ["--upstream", self.layout.marker(dep)]
        return argv + list(step.args)

    @cached_property
    def tasks(self) -> tuple[Task, ...]:
        """The steps grouped into tasks by `config.fuse`, in a valid order (see the module docstring)."""
        return _fuse(self)

    @cached_property
    def task_by_id(self) -> dict[str, Task]:
        return {t.id: t for t in self.tasks}

    def task_argv(self, task: Task) -> list[str]:
        """One `seamless` command line for the whole task: its steps' command lines joined by `--then`."""
        argv: list[str] = []
        for step_id in task.steps:
            argv += ([THEN] if argv else []) + self.argv(self.by_id[step_id])
        return argv

    def task_priorities(self) -> dict[str, int]:
        """`priorities` over the tasks: the length of the longest chain of tasks waiting on each."""
        return _longest_chains(self.tasks)

    def priorities(self) -> dict[str, int]:
        """Length of the longest chain of steps that waits on each step: run the longest first.

        The serial chains of the blocks are the critical path; this keeps them from being starved by
        steps that could wait (CPC of the source, say). Also the Airflow tasks' priority_weight.
        """
        return _longest_chains(self.steps)

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.kind] = counts.get(step.kind, 0) + 1
        return counts


def _longest_chains(items: tuple[Step, ...] | tuple[Task, ...]) -> dict[str, int]:
    """Per item (listed in a valid order), 1 + the longest chain of items that waits on it."""
    depth: dict[str, int] = {}
    dependants: dict[str, list[str]] = {s.id: [] for s in items}
    for item in items:
        for dep in item.deps:
            dependants[dep].append(item.id)
    for item in reversed(items):
        depth[item.id] = 1 + max((depth[c] for c in dependants[item.id]), default=0)
    return depth


_CHAIN = ("block_start", "compute_field", "vote", "block_render", "stitch")


def _fuse(plan: Plan) -> tuple[Task, ...]:
    """Group the plan's steps into tasks (`config.fuse`); each task's deps are the other tasks its steps wait on."""
    fuse = plan.config.fuse
    if fuse == "none":
        return tuple(Task(s.id, s.kind, (s.id,), s.deps, s.label, s.z, s.block, s.gpu) for s in plan.steps)
    blocks = plan.blocks
    owners = {z: b for b in blocks for z in b.sections}
    if fuse == "pairs":
        return _fuse_pairs(plan, owners)

    def owner(z: int) -> Block | None:
        """The block whose chain computes section z (a block's start belongs to the block before it)."""
        return owners.get(z)

    def chain_of(z: int) -> str:  # the task that computes (votes) section z
        block = owner(z)
        return f"b{block.index:03d}.chain" if fuse == "block" else f"z{z}.chain"

    def final_of(z: int) -> str:
        block = owner(z) or (blocks[0] if blocks else None)
        index = block.index if block else 0
        return f"b{index:03d}.final" if fuse == "block" else f"z{z}.final"

    def key(step: Step) -> str:
        assert step.z is not None
        if step.kind == "block_start":  # runs first in the chain of its block's first section
            return chain_of(step.z + 1)
        if step.kind in _CHAIN:  # a stitch copies the vote of the section it is: the end of that chain
            return chain_of(step.z)
        if step.kind == "cpc":  # needs the renders of z - 1 and z: with them when they share a task
            if final_of(step.z - 1) == final_of(step.z):
                return final_of(step.z)
            block = owner(step.z) or (blocks[0] if blocks else None)
            return f"b{block.index if block else 0:03d}.cpc"
        return final_of(step.z)  # compose, render, cpc_source

    members: dict[str, list[Step]] = {}
    for step in plan.steps:
        members.setdefault(key(step), []).append(step)
    task_of = {s.id: k for k, group in members.items() for s in group}
    deps = {k: sorted({task_of[d] for s in group for d in s.deps} - {k}) for k, group in members.items()}
    position = {s.id: i for i, s in enumerate(plan.steps)}
    first = {k: position[group[0].id] for k, group in members.items()}
    order: list[str] = []
    done: set[str] = set()
    pending = sorted(members, key=first.__getitem__)
    while pending:  # Kahn, stable in plan order
        ready = [k for k in pending if all(d in done for d in deps[k])]
        if not ready:
            raise ValueError(f"fusing steps made a cycle among tasks {pending[:5]}")
        order += ready
        done.update(ready)
        pending = [k for k in pending if k not in done]
    return tuple(_task(k, members[k], tuple(deps[k]), blocks) for k in order)


_PAIRED = {"block_render": "vote", "render": "compose"}  # a step -> the one it always directly follows


def _fuse_pairs(plan: Plan, owners: dict[int, Block]) -> tuple[Task, ...]:
    """`fuse: pairs`: a vote and its block render, a compose and its final render, a block's CPCs.

    Only steps that run back to back anyway share a task (a block render waits on its vote alone, a final
    render on its compose alone), so no chain gets longer and every compute_field keeps its own task (the k
    of a section run side by side); the CPC maps of a block's sections, cheap and off every critical
    path, are one task per block. Tasks keep their first step's id (`z12.vote`, `z12.compose`).
    """
    first_block = plan.blocks[0].index if plan.blocks else 0

    def key(step: Step) -> str:
        if step.kind in _PAIRED and len(step.deps) == 1 and plan.by_id[step.deps[0]].kind == _PAIRED[step.kind]:
            return step.deps[0]
        if step.kind in ("cpc", "cpc_source"):
            block = owners.get(step.z) if step.z is not None else None
            return f"b{block.index if block else first_block:03d}.cpc"
        return step.id

    members: dict[str, list[Step]] = {}
    for step in plan.steps:
        members.setdefault(key(step), []).append(step)
    task_of = {s.id: k for k, group in members.items() for s in group}
    tasks = []
    for task_id, group in members.items():  # plan order: a group's members all follow its deps' groups
        deps = tuple(sorted({task_of[d] for s in group for d in s.deps} - {task_id}))
        head = group[0]
        if len(group) == 1:
            tasks.append(Task(head.id, head.kind, (head.id,), deps, head.label, head.z, head.block, head.gpu))
        elif head.kind in ("cpc", "cpc_source"):
            tasks.append(_task(task_id, group, deps, plan.blocks))
        else:
            label = " + ".join([head.label, *(s.kind for s in group[1:])])
            tasks.append(Task(task_id, head.kind, tuple(s.id for s in group), deps, label, head.z, head.block,
                              any(s.gpu for s in group)))
    return _in_dependency_order(tasks)


def _in_dependency_order(tasks: list[Task]) -> tuple[Task, ...]:
    """A valid order, stable in the given one (usually valid already: one pass), else a cycle is a bug."""
    order: list[Task] = []
    done: set[str] = set()
    pending = tasks
    while pending:
        waiting = []
        for task in pending:
            if all(d in done for d in task.deps):
                order.append(task)
                done.add(task.id)
            else:
                waiting.append(task)
        if len(waiting) == len(pending):
            raise ValueError(f"fusing steps made a cycle among tasks {[t.id for t in waiting[:5]]}")
        pending = waiting
    return tuple(order)


def _task(task_id: str, steps: list[Step], deps: tuple[str, ...], blocks: tuple[Block, ...]) -> Task:
    kind = task_id.rsplit(".", 1)[1]
    zs = sorted({s.z for s in steps if s.z is not None})
    block = int(task_id[1:4]) if task_id.startswith("b") else steps[0].block
    counts: dict[str, int] = {}
    for s in steps:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    what = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in counts.items())
    where = f"z={zs[0]}" if len(zs) == 1 else f"z={zs[0]}-{zs[-1]}"
    label = f"{where} {kind}: {what}" if not task_id.startswith("b") else f"block {block} {where} {kind}: {what}"
    z = next((s.z for s in steps if s.kind not in ("block_start", "stitch") and s.z is not None), zs[0] if zs else None)
    return Task(task_id, kind, tuple(s.id for s in steps), deps, label, z, block, any(s.gpu for s in steps))


def split_blocks(start: int, stop: int, size: int, bad: Iterable[int] = ()) -> list[Block]:
    """Blocks of `size` sections overlapping by one; a bad section never starts a block."""
    bad_set = set(bad)
    good = [z for z in range(start, stop) if z not in bad_set]
    if not good:
        return []
    blocks: list[Block] = []
    begin = good[0]
    while begin < stop - 1:
        nominal = begin + size
        nxt = next((z for z in good if z >= nominal), None)
        end = stop - 1 if nxt is None or nominal >= stop - 1 else nxt
        blocks.append(Block(len(blocks), begin, end))
        begin = end
    return blocks


def vote_targets(z: int, block: Block, k: int, bad: set[int]) -> list[int]:
    """The nearest good sections before z in its block, an odd number of them (a strict majority)."""
    available = [t for t in range(z - 1, block.start - 1, -1) if t not in bad]
    count = min(k, len(available))
    count -= 1 - count % 2  # largest odd number <= count
    return available[:count]


def decay_weight(z: int, stitch_z: int, decay_dist: int) -> float:
    """How much of a stitch correction made at `stitch_z` still applies at z: 1 there, 0 after decay_dist."""
    return max(0.0, 1.0 - (z - stitch_z) / decay_dist)


class _Builder:
    def __init__(self, config: ProjectConfig) -> None:
        self.c = config
        self.layout = Layout(config.destination)
        self.stages: StagesSpec = config.stage_spec
        self.field_mip = self.stages.stages[-1].mip
        self.coarsest = self.stages.stages[0].mip
        self.bad = set(config.bad_sections)
        self.steps: list[Step] = []

    # --- argument helpers ---------------------------------------------------------------------------
    def region(self, z: int) -> list[str]:
        if self.c.bbox is None:
            return ["--z", f"{z}:{z + 1}"]
        x0, y0, x1, y1 = self.c.bbox
        return ["--bbox", f"{x0},{y0},{z}:{x1},{y1},{z + 1}", "--bbox-mip", "0"]

    def common(self, chunk: int | None = None) -> list[str]:
        args = ["--device", self.c.device]
        chunk = chunk if chunk is not None else self.c.chunk
        return args + (["--chunk", str(chunk)] if chunk else [])

    def fill(self) -> list[str]:
        return ["--fill-missing"] if self.c.fill_missing else []

    def add(self, step: Step) -> str:
        self.steps.append(step)
        return step.id

    # --- the workflow -------------------------------------------------------------------------------
    def build(self) -> Plan:
        start, stop = self.c.sections.start, self.c.sections.stop
        blocks = split_blocks(start, stop, self.c.blocks.size, self.bad)
        ready: dict[tuple[int, int], str] = {}  # (block, z) -> step after which z is a usable target
        voted: dict[int, str] = {}
        for block in blocks:
            ready[(block.index, block.start)] = self.block_start(block)
            for z in block.sections:
                voted[z] = self.section(block, z, ready)
        stitches = {b.index: self.stitch(b, voted[b.start]) for b in blocks[1:]}
        anchor = blocks[0].start if blocks else start
        for z in range(start, stop):
            self.final_render(z, self.compose(z, blocks, anchor, voted, stitches))
        for z in range(start + 1, stop):
            self.cpc(z)
        return Plan(self.c, self.layout, tuple(blocks), tuple(self.steps))

    def block_start(self, block: Block) -> str:
        z, layer = block.start, self.layout.block_image(block.index)
        return self.add(Step(f"b{block.index:03d}.z{z}.start", "block_start", (
            "copy", "--src", self.c.source, "--dst", layer, "--kind", "image", "--mip", str(self.field_mip),
            *self.block_pyramid(), *self.region(z), *self.fill(), "--refuse-empty"), z=z, mip=self.field_mip,
            block=block.index))

    def block_pyramid(self) -> list[str]:
        """Targets are read at every stage's MIP: the step that writes one builds its coarser MIPs too."""
        return ["--downsample-to", str(self.coarsest)] if self.coarsest > self.field_mip else []

    def section(self, block: Block, z: int, ready: dict[tuple[int, int], str]) -> str:
        """compute_field onto each target, vote, and (if a later section needs it) render into the block."""
        targets = vote_targets(z, block, self.c.vote.k, self.bad)
        finals = [self.compute_field(block, z, rank, t, ready[(block.index, t)]) for rank, t in enumerate(targets, 1)]
        vote = self.add(Step(f"z{z}.vote", "vote", (
            "vote", *[a for rank in range(1, len(targets) + 1) for a in ("--field", self.layout.target_field(rank))],
            "--dst", self.layout.voted, "--agreement", self.layout.agreement, "--z", str(z),
            "--mip", str(self.field_mip), "--temperature", str(self.c.vote.temperature), "--blur", str(self.c.vote.blur),
            *self._bbox_only(z), *self.common()), tuple(finals), z=z, mip=self.field_mip, block=block.index, gpu=True))
        if z < block.stop and z not in self.bad:  # a target for later sections of this block
            # Holes are filled from the block's previous good section: target 1, whose render the vote
            # already waits for (through z's first compute_field), so the vote and this render stay fusable.
            holes = ["--fill-holes-from", str(targets[0])] if self.c.blocks.fill_targets and targets else []
            ready[(block.index, z)] = self.add(Step(f"b{block.index:03d}.z{z}.render", "block_render", (
                "render", "--src", self.c.source, "--field", self.layout.voted, "--field-mip", str(self.field_mip),
                "--dst", self.layout.block_image(block.index), "--mip", str(self.field_mip), *self.mask_args(self.field_mip),
                *holes, *self.block_pyramid(), *self.region(z), *self.common(), *self.fill()), (vote,), z=z,
                mip=self.field_mip, block=block.index, gpu=True))
        return vote

    def compute_field(self, block: Block, z: int, rank: int, target: int, target_ready: str) -> str:
        stages = self.stages.stages
        groups = [[i] for i in range(len(stages))] if self.c.granularity == "stage" else [list(range(len(stages)))]
        previous = target_ready
        for group in groups:
            first, last = stages[group[0]], stages[group[-1]]
            suffix = f".m{last.mip}" if self.c.granularity == "stage" else ""
            args = [
                "compute-field", "--src", self.c.source, "--tgt", self.layout.block_image(block.index),
                "--dst", self.layout.target_field(rank), "--z", str(z), "--tgt-z", str(target),
                "--stages", self._stages_arg(), "--pad", str(self.c.pad), "--on-empty-target", "init",
                *self._bbox_only(z), *self.common(), *self.fill(),
            ]
            if self.c.batch > 1:
                args += ["--batch", str(self.c.batch)]
            if self.c.granularity == "stage":
                args += ["--stage-range", f"{group[0]}:{group[-1] + 1}"]
            if self.c.mask:
                args += ["--src-mask", self.c.mask]
                if target == block.start:  # an unwarped copy: the source's mask is in its frame
                    args += ["--tgt-mask", self.c.mask]
            deps = (previous,) if previous == target_ready else (previous, target_ready)
            previous = self.add(Step(f"z{z}.t{rank}{suffix}.compute_field", "compute_field", tuple(args), deps,
                                     z=z, mip=first.mip if len(group) == 1 else last.mip, block=block.index, gpu=True))
        return previous

    def stitch(self, block: Block, previous_vote: str) -> str:
        """Block b's frame -> block b-1's: the field block b-1 voted for the section they share."""
        return self.add(Step(f"b{block.index:03d}.stitch", "stitch", (
            "copy", "--src", self.layout.voted, "--dst", self.layout.stitch, "--kind", "field",
            "--mip", str(self.field_mip), *self.region(block.start)), (previous_vote,),
            z=block.start, mip=self.field_mip, block=block.index))

    def compose(self, z: int, blocks: list[Block], anchor: int, voted: dict[int, str], stitches: dict[int, str]) -> str:
        owner = next((b for b in blocks if b.start < z <= b.stop), None)
        args = ["compose", "--dst", self.layout.final_field, "--z", str(z), "--mip", str(self.field_mip)]
        deps: list[str] = []
        if owner is not None:
            for b in blocks[1 : owner.index + 1]:  # outermost (oldest) stitch first
                weight = decay_weight(z, b.start, self.c.blocks.decay_dist)
                if weight > 0:
                    args += ["--field", self.layout.stitch, "--at", str(b.start), "--weight", f"{weight:.6g}"]
                    deps.append(stitches[b.index])
            args += ["--field", self.layout.voted, "--at", str(z), "--weight", "1"]
            deps.append(voted[z])
        else:  # the anchor (and sections before the first good one): identity
            args += ["--like", self.c.source]
        args += [*self._bbox_only(z), *self.common()]
        return self.add(Step(compose_step(z), "compose", tuple(args), tuple(deps), z=z, mip=self.field_mip, gpu=True))

    def final_render(self, z: int, compose: str) -> str:
        """Render at render.mip and build the pyramid above it (CPC and the viewer read coarser MIPs)."""
        mip = self.c.render.mip
        top = max(self.c.cpc.mip, self.coarsest, mip + 1)
        return self.add(Step(f"z{z}.render", "render", (
            "render", "--src", self.c.source, "--field", self.layout.final_field, "--field-mip", str(self.field_mip),
            "--dst", self.layout.image, "--mip", str(mip), *self.mask_args(mip), "--downsample-to", str(top),
            *self.region(z), *self.common(self.c.render.chunk), *self.fill()), (compose,), z=z, mip=mip, gpu=True))

    def cpc(self, z: int) -> None:
        common = ["--mip", str(self.c.cpc.mip), "--patch", str(self.c.cpc.patch), *self.region(z), "--device", self.c.device]
        after = tuple(f"z{v}.render" for v in (z - 1, z))
        self.add(Step(f"z{z}.cpc", "cpc", ("cpc", "--src", self.layout.image, "--dst", self.layout.cpc, *common), after,
                      z=z, mip=self.c.cpc.mip))
        self.add(Step(f"z{z}.cpc_source", "cpc_source", ("cpc", "--src", self.c.source, "--dst", self.layout.cpc_source,
                                                         *common, *self.fill()), (), z=z, mip=self.c.cpc.mip))

    # --- small pieces -------------------------------------------------------------------------------
    def mask_args(self, mip: int) -> list[str]:
        return ["--mask", self.c.mask, "--mask-mip", str(mip)] if self.c.mask else []

    def _bbox_only(self, z: int) -> list[str]:
        if self.c.bbox is None:
            return []
        x0, y0, x1, y1 = self.c.bbox
        return ["--bbox", f"{x0},{y0},{z}:{x1},{y1},{z + 1}", "--bbox-mip", "0"]

    def _stages_arg(self) -> str:
        import json

        return self.c.stages if isinstance(self.c.stages, str) else json.dumps(self.c.stages, separators=(",", ":"))


def build_plan(config: ProjectConfig) -> Plan:
    """The whole workflow for the config's section range, in a valid execution order."""
    return _Builder(config).build()


def topological(steps: Iterable[Step]) -> Iterator[Step]:
    """Steps in dependency order (the builder already emits one; this checks it for other producers)."""
    done: set[str] = set()
    pending = list(steps)
    while pending:
        progressed = [s for s in pending if all(d in done for d in s.deps)]
        if not progressed:
            raise ValueError(f"dependency cycle or missing step among {[s.id for s in pending][:5]}")
        for s in progressed:
            done.add(s.id)
            yield s
        pending = [s for s in pending if s.id not in done]
