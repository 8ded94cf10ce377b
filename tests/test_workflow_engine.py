"""The pure workflow instance machine: evQueue's execution semantics (reference/evqueue.md §2.5, §3, §5.2),
driven with task results and the time, no processes."""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from lxml import etree

from jobd import safexml
from jobd.engine import instance_counters
from jobd.engine.instance_counters import Counters
from jobd.engine.workflow import (
    NEXT_EVQID,
    DequeueTask,
    Instance,
    InstanceFinished,
    InstanceStatus,
    NodeStatus,
    OutputCut,
    RetryLater,
    RunTask,
    TaskResult,
    local_time,
    xml_safe_text,
)
from jobd.errors import ConfigError, InvalidWorkflowParameters
from jobd.model import Outcome, ParameterMode, RetryLevel, RetryPolicy, RetrySchedule, TaskDef, WorkflowDef

CORPUS = Path(__file__).parent / "workflow_corpus"
NOW = 1_790_000_000.0
JOBD_SOURCE = str(Path(safexml.__file__).parent)  # the jobd package's directory
COUNTERS = ("running_tasks", "queued_tasks", "retrying_tasks", "error_tasks", "waiting_conditions")
FAST_THEN_SLOW = RetrySchedule("fast_then_slow", (RetryLevel(1, 2), RetryLevel(5, 1)))


# ---------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def counters_agree_with_a_recount(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every event of every test here, the counters the machine kept as nodes changed are exactly those a
    count of the whole document from nothing gives: same values, same attributes, same order; and so are its
    counts of tasks and of tasks that will never run (the progress figure's)."""
    if "no_recount_check" in request.keywords:
        return
    settle = Instance._settle

    def checked(instance: Instance, now: float) -> list[Any]:
        actions = settle(instance, now)
        recounted = copy.deepcopy(instance.root)
        counters = Counters(recounted)
        counters.recount()
        assert etree.tostring(instance.root) == etree.tostring(recounted)
        assert (instance.task_count, instance.never_run) == (counters.tasks, counters.never_run)
        return actions

    monkeypatch.setattr(Instance, "_settle", checked)


def launch(
    source: str | bytes,
    parameters: dict[str, str] | None = None,
    *,
    name: str = "wf",
    queues: frozenset[str] = frozenset({"default", "other"}),
    now: float = NOW,
    **options: Any,
) -> tuple[Instance, list[Any]]:
    data = source.encode() if isinstance(source, str) else source
    options.setdefault("instance_id", 1)
    return Instance.launch(WorkflowDef(name, f"{name}.xml", data), parameters or {}, now=now, queues=queues, **options)


def runs(actions: list[Any]) -> list[RunTask]:
    return [action for action in actions if isinstance(action, RunTask)]


def finish(instance: Instance, evqid: int, result: TaskResult | None = None, now: float = NOW) -> list[Any]:
    """The task's job starts and ends at `now`."""
    assert instance.task_started(evqid, 1000 + evqid, now) == []
    return instance.task_ended(evqid, result or TaskResult.exited(0), now)


def task_of(instance: Instance, evqid: int) -> etree._Element:
    element = instance.task(evqid)
    assert element is not None
    return element


def jobs(instance: Instance, name: str) -> list[etree._Element]:
    return [job for job in instance.root.iter("job") if job.get("name") == name]


def one_task(instance: Instance, job_name: str) -> etree._Element:
    [job] = jobs(instance, job_name)
    task = job.find("tasks/task")
    assert task is not None
    return task


def evqid(element: etree._Element) -> int:
    return int(element.get("evqid", "0"))


def _attributes(attributes: dict[str, str]) -> str:
    """Keyword arguments as XML attributes: evQueue spells most with hyphens, retry_* and queue_host with _."""
    names = {
        key: key if key.startswith("retry_") or key == "queue_host" else key.replace("_", "-") for key in attributes
    }
    return "".join(f' {names[key]}="{value}"' for key, value in attributes.items())


def workflow(jobs_xml: str, head: str = "") -> str:
    return f"<workflow>{head}<subjobs>{jobs_xml}</subjobs></workflow>"


def job(name: str, tasks: str, subjobs: str = "", **attributes: str) -> str:
    extra = _attributes(attributes)
    inner = f"<subjobs>{subjobs}</subjobs>" if subjobs else ""
    return f'<job name="{name}"{extra}><tasks>{tasks}</tasks>{inner}</job>'


def task(path: str, inner: str = "", **attributes: str) -> str:
    attributes.setdefault("queue", "default")
    extra = _attributes(attributes)
    return f'<task path="{path}"{extra}>{inner}</task>'


# ------------------------------------------------------------------------------- comparing instance documents

TIMES = ("start_time", "end_time", "execution_time", "exit_time", "retry_at", "retry-at-unix", "id")


def normalised(root: etree._Element) -> etree._Element:
    """Ids renumbered 1.. in numeric order (context-id follows), times and instance id made equal."""
    root = copy.deepcopy(root)
    numbers = sorted({int(e.get("evqid", "0")) for e in root.iter() if isinstance(e.tag, str) and e.get("evqid")})
    renumber = {str(old): str(new) for new, old in enumerate(numbers, 1)}
    for element in root.iter():
        if not isinstance(element.tag, str):
            continue
        for name in TIMES:
            if name in element.attrib:
                element.set(name, "T")
        for name in ("evqid", "context-id"):
            if name in element.attrib:
                element.set(name, renumber[element.get(name, "")])
    return root


def assert_same_instance(actual: etree._Element, expected: etree._Element, path: str = "") -> None:
    """Same elements, attributes and text (surrounding whitespace aside). jobd writes all five counters where
    evQueue wrote only those it had touched, so extra counters are allowed when they are 0; and the root's
    next-evqid, jobd's own (the number the next node gets)."""
    where = f"{path}/{expected.tag}"
    assert actual.tag == expected.tag, where
    for name, value in expected.attrib.items():
        assert actual.get(name) == value, f"{where}/@{name}: {actual.get(name)!r} != {value!r}"
    jobds = {NEXT_EVQID} if not path else set()
    extra = {name: value for name, value in actual.attrib.items() if name not in expected.attrib and name not in jobds}
    assert all(name in COUNTERS and value == "0" for name, value in extra.items()), f"{where}: extra {extra}"
    assert (actual.text or "").strip() == (expected.text or "").strip(), f"{where} text"
    actual_children = [child for child in actual if isinstance(child.tag, str)]
    expected_children = [child for child in expected if isinstance(child.tag, str)]
    assert [c.tag for c in actual_children] == [c.tag for c in expected_children], where
    for mine, theirs in zip(actual_children, expected_children, strict=True):
        assert (mine.tail or "").strip() == (theirs.tail or "").strip(), f"{where}/{theirs.tag} tail"
        assert_same_instance(mine, theirs, where)


# ----------------------------------------------------------------------------------- the reference's examples

LIST_OUTPUT = (
    b'<files>\n<file name="f1.txt" size="10"/>\n<file name="f2.txt" size="20"/>\n<file name="f3.txt" size="30"/>\n'
    b"</files>\n"
)


def show_output(name: str, size: int) -> bytes:
    return f"argc=0 args=[] PARAM_A=file={name} EVQUEUE_ENV=true cwd=/tmp\nstdin=[size is {size}]\n".encode()


def test_trivial_example_gives_evqueues_instance() -> None:
    instance, actions = launch((CORPUS / "hello.xml").read_bytes(), name="trivial", instance_id=2, comment="async one")
    [run] = actions
    assert run.argv == ("/bin/echo", "hello", "world")
    assert run.queue == "default"
    assert run.env == {"EVQUEUE_ENV": "true", "EVQUEUE_IPC_QID": "0"}
    assert run.stdin is None and run.script is None and run.working_dir is None
    assert instance.status is InstanceStatus.EXECUTING
    assert instance.counters()["running_tasks"] == 1 and instance.counters()["queued_tasks"] == 1
    end = finish(instance, run.evqid, TaskResult.exited(0, stdout=b"hello world\n"), NOW + 1)
    assert end == [InstanceFinished(InstanceStatus.TERMINATED, 0)]
    expected = etree.fromstring((CORPUS / "hello_instance.xml").read_bytes())
    assert_same_instance(normalised(safexml.parse(instance.to_xml())), normalised(expected))
    assert instance.root.get("start_time") == local_time(NOW)
    assert instance.root.get("end_time") == local_time(NOW + 1)


def test_loopdemo_example_gives_evqueues_instance() -> None:
    source = (CORPUS / "loopdemo.xml").read_bytes()
    instance, actions = launch(source, {"count": "3"}, name="loopdemo", instance_id=4)
    [listing] = actions
    assert listing.argv == ("list.sh", "3")
    instance.task_started(listing.evqid, 7, NOW)
    assert task_of(instance, listing.evqid).get("tid") == "7"
    instance.task_progress(listing.evqid, 50)
    assert task_of(instance, listing.evqid).get("progression") == "50"
    result = TaskResult.exited(0, stdout=LIST_OUTPUT, stderr=b"some stderr\n", log="a log line\n")
    shows = runs(instance.task_ended(listing.evqid, result, NOW))
    assert [(run.env["PARAM_A"], run.stdin, run.working_dir) for run in shows] == [
        ("file=f2.txt", b"size is 20", "/tmp"),
        ("file=f3.txt", b"size is 30", "/tmp"),
    ]
    assert all(run.argv == ("show.sh",) and run.env["EVQUEUE_ENV"] == "true" for run in shows)
    f2 = TaskResult.exited(0, stdout=show_output("f2.txt", 20), stderr=b"err line\n")
    assert finish(instance, shows[0].evqid, f2) == []
    [finished] = finish(
        instance, shows[1].evqid, TaskResult.exited(0, stdout=show_output("f3.txt", 30), stderr=b"err line\n")
    )
    # jobd stores custom attributes of numbers too (evQueue refused: "Evaluation result is not a node")
    assert finished == InstanceFinished(InstanceStatus.TERMINATED, 0, (("nfiles", "3"),), ("big",))
    expected = etree.fromstring((CORPUS / "loopdemo_instance.xml").read_bytes())
    assert_same_instance(normalised(instance.root), normalised(expected))
    # jobd numbers nodes as evQueue does, so even the ids agree before normalisation
    assert [e.get("evqid") for e in instance.root.iter() if isinstance(e.tag, str) and e.get("evqid")] == [
        e.get("evqid") for e in expected.iter() if isinstance(e.tag, str) and e.get("evqid")
    ]


# ------------------------------------------------------------------------------------------------ parameters


def test_parameters_are_validated_with_evqueues_messages() -> None:
    """evQueue's message first, then what the workflow takes (and, when some are left out, which)."""
    source = (CORPUS / "loopdemo.xml").read_bytes()
    with pytest.raises(
        InvalidWorkflowParameters,
        match=r"^Invalid number of parameters passed to workflow \(passed 0, expected 1\); wf takes: count "
        r"\(missing: count\)$",
    ):
        launch(source)
    with pytest.raises(InvalidWorkflowParameters, match=r"^Unknown parameter : other; wf takes: count$"):
        launch(source, {"count": "1", "other": "2"})
    with pytest.raises(InvalidWorkflowParameters, match=r"^Unknown parameter : other; wf takes no parameters$"):
        launch(workflow(job("a", task("/bin/true"))), {"other": "2"})
    instance, _ = launch(source, {"count": "a<b&\x00"})
    assert instance.root.findtext("parameters/parameter") == "a<b&\u2400"


def test_instance_attributes_from_launch() -> None:
    instance, _ = launch(workflow(job("a", task("/bin/true"))), name="demo", instance_id=42, comment="hi")
    root = instance.root
    assert (root.get("id"), root.get("name"), root.get("comment"), root.get("status")) == (
        "42",
        "demo",
        "hi",
        "EXECUTING",
    )
    assert root.get("evqid") == "1" and root.get("host") is None


# ------------------------------------------------------------------------------------------- jobs and subjobs


def test_sibling_jobs_start_together_and_subjobs_wait_for_every_task() -> None:
    source = workflow(
        job("a", task("/bin/a1") + task("/bin/a2"), job("child", task("/bin/c"))) + job("b", task("/bin/b"))
    )
    instance, actions = launch(source)
    assert [run.argv for run in runs(actions)] == [("/bin/a1",), ("/bin/a2",), ("/bin/b",)]
    a1, a2, _b = runs(actions)
    assert finish(instance, a1.evqid) == []
    [child] = runs(finish(instance, a2.evqid))
    assert child.argv == ("/bin/c",)
    counters = instance.counters()
    assert counters["running_tasks"] == 2 and counters["queued_tasks"] == 2
    [a_job] = jobs(instance, "a")
    assert a_job.get("running_tasks") == "1"  # the child's task counts in its ancestors


def test_a_failed_task_blocks_its_subtree_and_counts_as_an_error() -> None:
    instance, actions = launch(workflow(job("a", task("/bin/a"), job("child", task("/bin/c")))))
    [end] = finish(instance, actions[0].evqid, TaskResult.exited(3, stdout=b"out", stderr=b"bad\n"))
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 1)
    assert instance.errors == 1 and instance.root.get("errors") == "1"
    failed = task_of(instance, actions[0].evqid)
    assert (failed.get("status"), failed.get("retval")) == ("TERMINATED", "3")
    assert failed.findtext("output") == "out" and failed.findtext("stderr") == "bad\n"
    [child] = jobs(instance, "child")
    assert child.get("evqid") is None  # never started


def test_exit_codes_above_127_are_kept_and_signals_give_minus_one() -> None:
    instance, actions = launch(workflow(job("a", task("/bin/a") + task("/bin/b"))))
    finish(instance, actions[0].evqid, TaskResult.exited(200))
    assert task_of(instance, actions[0].evqid).get("retval") == "200"
    finish(instance, actions[1].evqid, TaskResult.killed(9, stderr=b"killed"))
    killed = task_of(instance, actions[1].evqid)
    assert killed.get("retval") == "-1"
    output = killed.find("output")
    assert output is not None and output.get("signal") == "9" and output.get("retval") == "-1"
    assert instance.errors == 2
    with pytest.raises(ValueError, match="0–255"):
        TaskResult.exited(256)


# ------------------------------------------------------------------------------------------------- conditions


def test_conditions_on_jobs_and_tasks() -> None:
    source = workflow(
        job("off", task("/bin/x"), condition="evqGetWorkflowParameter('p') = 'no'")
        + job(
            "on", task("/bin/y") + task("/bin/z", condition="1 = 2"), condition="evqGetWorkflowParameter('p') = 'yes'"
        ),
        head='<parameters><parameter name="p"/></parameters>',
    )
    instance, actions = launch(source, {"p": "yes"})
    assert [run.argv for run in runs(actions)] == [("/bin/y",)]
    [off] = jobs(instance, "off")
    assert (off.get("status"), off.get("details")) == ("SKIPPED", "Condition evaluates to false")
    assert off.get("condition") is not None
    [on] = jobs(instance, "on")
    assert (on.get("status"), on.get("details"), on.get("condition")) == (None, "Condition evaluates to true", None)
    z = on.findall("tasks/task")[1]
    assert (z.get("status"), z.get("details")) == ("SKIPPED", "Condition evaluates to false")
    assert off.get("running_tasks") is None and on.get("running_tasks") == "1"


def test_a_job_whose_tasks_are_all_skipped_runs_its_subjobs_at_once() -> None:
    _, actions = launch(workflow(job("a", task("/bin/a", condition="false()"), job("child", task("/bin/c")))))
    assert [run.argv for run in runs(actions)] == [("/bin/c",)]


def test_a_condition_that_cannot_be_evaluated_aborts_the_node() -> None:
    instance, actions = launch(
        workflow(job("bad", task("/bin/a"), condition="evqGetParentJob(5)") + job("good", task("/bin/b")))
    )
    assert [run.argv for run in runs(actions)] == [("/bin/b",)]
    [bad] = jobs(instance, "bad")
    assert bad.get("status") == "ABORTED"
    assert bad.get("error", "").startswith("Error evaluating condition : ")
    assert instance.counters()["error_tasks"] == 1
    [end] = finish(instance, actions[0].evqid)
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 1)
    assert (instance.task_count, instance.never_run) == (2, 1)


def test_a_subjob_aborted_after_a_task_end_leaves_its_tasks_never_run() -> None:
    below = job("bad", task("/bin/b") + task("/bin/c"), condition="evqGetParentJob(5)")
    instance, actions = launch(workflow(job("first", task("/bin/a"), subjobs=below)))
    assert (instance.task_count, instance.never_run) == (3, 0)
    [end] = finish(instance, runs(actions)[0].evqid)
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 1)
    assert jobs(instance, "bad")[0].get("status") == "ABORTED"
    assert (instance.task_count, instance.never_run) == (3, 2)


# ------------------------------------------------------------------------------------------------------ loops


LISTING = job(
    "list",
    task("list.sh", name="list", output_method="XML"),
    job(
        "each",
        task("show.sh", '<input name="size"><value select="@size"/></input>', loop="file"),
        loop="evqGetParentJob()/evqGetOutput('list')/files",
    ),
)


def test_task_loop_clones_the_task_per_node_with_its_context() -> None:
    instance, actions = launch(workflow(LISTING))
    shows = runs(finish(instance, actions[0].evqid, TaskResult.exited(0, stdout=LIST_OUTPUT)))
    assert [run.argv for run in shows] == [("show.sh", "10"), ("show.sh", "20"), ("show.sh", "30")]
    files = instance.root.findall(".//files/file")
    clones = one_task(instance, "each").getparent()
    assert clones is not None
    assert [t.get("context-id") for t in clones] == [f.get("evqid") for f in files]
    assert len({run.evqid for run in shows}) == 3


@pytest.mark.no_recount_check  # that check counts the whole document on purpose
def test_an_event_of_a_large_loop_looks_at_the_nodes_it_changes_not_at_the_whole_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting the whole document after each event made a loop of n tasks cost n² (2,000 iterations: 159 s in a
    real jobd); the counters now follow the nodes an event changes, so the tenth and the last task of a loop of 600
    cost the same number of looks at a node's share, and the counters still add up."""
    items = "".join(f'<file name="f{n}" size="{n}"/>' for n in range(600)).encode()
    instance, actions = launch(workflow(LISTING))
    shows = runs(finish(instance, actions[0].evqid, TaskResult.exited(0, stdout=b"<files>" + items + b"</files>")))
    assert len(shows) == 600
    looked = 0
    share = instance_counters.share

    def counted(node: etree._Element) -> instance_counters.Share:
        nonlocal looked
        looked += 1
        return share(node)

    monkeypatch.setattr(instance_counters, "share", counted)
    looks = []
    for number, run in enumerate(shows):
        looked = 0
        instance.task_started(run.evqid, 5000 + number, NOW)
        instance.task_ended(run.evqid, TaskResult.exited(0 if number % 3 else 1), NOW)
        looks.append(looked)
    assert looks[10] == looks[-2] <= 2, looks
    assert instance.status is InstanceStatus.TERMINATED
    assert instance.root.get("error_tasks") == instance.root.get("errors") == "200"
    recounted = copy.deepcopy(instance.root)
    Counters(recounted).recount()
    assert etree.tostring(instance.root) == etree.tostring(recounted)


def test_iteration_condition_uses_each_item_and_numeric_comparisons_work() -> None:
    source = workflow(
        job(
            "list",
            task("list.sh", name="list", output_method="XML"),
            job(
                "big",
                task("big.sh", '<input><value select="@name"/></input>'),
                loop="evqGetParentJob()/evqGetOutput('list')/files/file",
                iteration_condition="@size &gt; 10",
            ),
        )
    )
    instance, actions = launch(source)
    shows = runs(finish(instance, actions[0].evqid, TaskResult.exited(0, stdout=LIST_OUTPUT)))
    assert [run.argv for run in shows] == [("big.sh", "f2.txt"), ("big.sh", "f3.txt")]
    first = jobs(instance, "big")[0]
    assert (first.get("status"), first.get("condition")) == ("SKIPPED", "@size > 10")
    assert all(j.get("loop") is None and j.get("iteration-condition") is None for j in jobs(instance, "big"))


def test_a_loop_over_nothing_runs_nothing_and_finishes() -> None:
    source = workflow(job("a", task("/bin/a"), loop="/workflow/nothing", subjobs=job("c", task("/bin/c"))))
    instance, actions = launch(source)
    assert actions == [InstanceFinished(InstanceStatus.TERMINATED, 0)]
    assert jobs(instance, "a") == []


def test_a_loop_over_jobs_that_have_not_run_numbers_them_and_they_count_from_then_on() -> None:
    """An item of a loop is numbered to be its iteration's context. A job of the workflow numbered so before it
    runs carries its (zero) counters from then on, as a count of the whole document says (the autouse check), and
    still runs when its turn comes (it did not: being numbered was taken for having run)."""
    source = workflow(
        job("a", task("/bin/a", loop="/workflow/subjobs/job/subjobs/job"), subjobs=job("c", task("/bin/c")))
    )
    instance, actions = launch(source)
    later = jobs(instance, "c")[0]
    assert later.get("evqid") is not None and later.get("running_tasks") == "0"
    assert len(runs(actions)) == 1
    for run in runs(actions):
        assert runs(finish(instance, run.evqid)) != []  # c runs


def test_a_loop_over_task_and_job_elements_of_an_output_counts_only_the_workflows() -> None:
    """A loop's items are numbered to be their iterations' contexts. Elements of a task's output named <task> or
    <job>, with a status, are not the workflow's: they are not counted, carry no counters and are not told of. They
    were, and an instance whose tasks had all ended stayed EXECUTING, one "running" output element too many."""
    items = (
        b'<report><task name="x" status="QUEUED"/><task name="y" status="TERMINATED" retval="3"/>'
        b'<job name="z" status="WAITING"/></report>'
    )
    source = workflow(
        job(
            "list",
            task("list.sh", name="list", output_method="XML"),
            job("each", task("show.sh", loop="evqGetParentJob()/evqGetOutput('list')/report/*")),
        )
    )
    instance, actions = launch(source)
    instance.take_changed_tasks()
    shows = runs(finish(instance, actions[0].evqid, TaskResult.exited(0, stdout=items)))
    assert len(shows) == 3
    assert {task.get("path") for task in instance.take_changed_tasks()} == {"list.sh", "show.sh"}
    assert instance.counters()["running_tasks"] == 3 and instance.counters()["waiting_conditions"] == 0
    for show in shows:
        finish(instance, show.evqid)
    assert instance.status is InstanceStatus.TERMINATED and instance.errors == 0
    report = instance.root.find(".//output/report")
    assert report is not None and all(item.get("running_tasks") is None for item in report)
    assert (instance.task_count, instance.never_run) == (4, 0)


def test_a_restored_document_numbers_nodes_as_the_first_run_did_though_its_highest_numbers_left() -> None:
    """W1 and W2 wait, then loop over nothing: both leave the document with the two highest numbers. A document
    restored from then on numbered its next node from its highest number left, lower than the first run did, and a
    task's job key holds its number (so it found nothing, or another task's job). The root keeps the next number."""
    waits = "evqWait(//task[@path='/bin/x']/@status = 'TERMINATED')"
    looping = [job(name, task(f"/bin/{name}"), condition=waits, loop="/workflow/nothing") for name in ("W1", "W2")]
    source = workflow(job("A", task("/bin/a"), job("B", task("/bin/b") + task("/bin/x"), job("C", task("/bin/c")))
                          + "".join(looping)))  # fmt: skip
    first, actions = launch(source)
    b, x = runs(finish(first, runs(actions)[0].evqid))
    finish(first, x.evqid)  # W1 and W2 may run: their loops select nothing
    assert jobs(first, "W1") == jobs(first, "W2") == []
    saved = first.to_xml()
    restored, _ = Instance.restore(saved, queues=frozenset({"default", "other"}))
    [c_first] = runs(finish(first, b.evqid))
    [c_again] = runs(restored.task_ended(b.evqid, TaskResult.exited(0), NOW))
    assert c_again.evqid == c_first.evqid


def test_the_copies_a_loop_makes_of_a_job_number_what_was_numbered_in_it() -> None:
    """J loops after P's task looped over J's task: that task was numbered (as an item, to be a context) before J
    was copied, and each copy kept its number: the copies' tasks shared one job key, one ran and the other stayed
    QUEUED for good. A copy gets numbers of its own for everything numbered in it."""
    source = workflow(
        job("P", task("/bin/p", loop="/workflow/subjobs/job[@name='J']/tasks/task"))
        + job(
            "J", task("/bin/j"), loop="/workflow/subjobs/job[@name='P'] | /workflow/subjobs/job[@name='P']/tasks/task"
        )
    )
    instance, actions = launch(source)
    numbers = [run.evqid for run in runs(actions)]
    assert len(numbers) == len(set(numbers)) == 3, runs(actions)
    for number in numbers:
        finish(instance, number)
    assert instance.status is InstanceStatus.TERMINATED


def test_a_loop_must_select_elements() -> None:
    instance, actions = launch(workflow(job("a", task("/bin/a"), loop="//@name")))
    [a] = jobs(instance, "a")
    assert a.get("status") == "ABORTED" and "must select elements" in a.get("error", "")
    assert actions == [InstanceFinished(InstanceStatus.TERMINATED, 1)]


# ----------------------------------------------------------------------------------------- inputs and stdin


def test_inputs_values_copies_conditions_and_loops() -> None:
    inputs = (
        '<input name="a">x=<value select="evqGetWorkflowParameter(\'p\')"/>;n=<value select="1 + 1"/>.</input>'
        '<input name="skipped" condition="false()">never</input>'
        '<input name="each" loop="/workflow/parameters/parameter"><value select="@name"/></input>'
        '<stdin>before <copy select="/workflow/parameters"/> after</stdin>'
    )
    source = workflow(
        job("a", task("/bin/cmd 'quoted arg'", inputs)), head='<parameters><parameter name="p"/></parameters>'
    )
    instance, [run, *_] = launch(source, {"p": "v"})
    assert run.argv == ("/bin/cmd", "quoted arg", "x=v;n=2.", "p")
    element = task_of(instance, run.evqid)
    assert [i.get("mode") for i in element.findall("input")] == ["text", None, "text"]
    skipped = element.findall("input")[1]
    assert skipped.get("status") == "SKIPPED"
    stdin = element.find("stdin")
    assert stdin is not None and stdin.get("mode") == "xml"
    assert (
        run.stdin
        == b'<stdin mode="xml">before <parameters><parameter name="p">v</parameter></parameters> after</stdin>'
    )


def test_env_mode_and_a_value_error_aborts_the_task() -> None:
    source = workflow(
        job(
            "a",
            task(
                "/bin/env",
                '<input name="A">1</input><input name="B"><value select="@x"/></input>',
                parameters_mode="ENV",
            )
            + task("/bin/bad", '<input><value select="evqGetParentJob(9)"/></input>'),
        )
    )
    instance, actions = launch(source)
    [run] = runs(actions)
    assert run.argv == ("/bin/env",) and run.env["A"] == "1" and run.env["B"] == ""
    bad = instance.root.findall(".//task")[1]
    assert bad.get("status") == "ABORTED" and bad.get("error", "").startswith("Error computing input value : ")


def test_script_tasks_return_their_script() -> None:
    source = workflow(
        job(
            "a",
            '<task type="SCRIPT" name="s" queue="default"><input>arg</input>'
            '<script>#!/bin/sh\necho <value select="1+2"/></script></task>',
        )
    )
    _, [run, *_] = launch(source)
    assert run.script == "#!/bin/sh\necho 3" and run.argv == ("arg",) and run.name == "s"


def test_toml_tasks_bring_command_queue_timeout_and_retry() -> None:
    resize = TaskDef(
        "resize",
        ("/usr/bin/convert", "-resize", "50%"),
        queue="photo",
        timeout=60.0,
        retry=RetryPolicy(times=2),
        working_dir="/srv",
        environment={"X": "1"},
    )
    env_task = TaskDef("envy", ("/bin/env",), parameters=ParameterMode.ENV)
    source = workflow(
        job(
            "a",
            '<task task="resize"><input>in.jpg</input></task><task task="envy"><input name="V">v</input></task>'
            '<task task="nosuch"/>',
        )
    )
    instance, actions = launch(
        source, queues=frozenset({"photo", "default"}), tasks={"resize": resize, "envy": env_task}
    )
    first, second = runs(actions)
    assert first.argv == ("/usr/bin/convert", "-resize", "50%", "in.jpg")
    assert (first.queue, first.timeout, first.retry, first.working_dir, first.task) == (
        "photo",
        60.0,
        RetryPolicy(times=2),
        "/srv",
        "resize",
    )
    assert first.env["X"] == "1"
    assert second.argv == ("/bin/env",) and second.env["V"] == "v" and second.queue == "default"
    missing = instance.root.findall(".//task")[2]
    assert missing.get("error") == "Unknown task name 'nosuch'"


def test_unknown_queue_and_remote_attributes_abort_at_enqueue() -> None:
    """A host or a user makes a task remote; queue_host and use-agent alone do not (evQueue ran such a task here)."""
    source = workflow(
        job(
            "a",
            task("/bin/a", queue="nosuch")
            + task("/bin/b", host="{/workflow/@name}")
            + task("/bin/c", use_agent="yes")
            + task("/bin/d", user="www-data")
            + task("/bin/e", host="")
            + task("/bin/f", queue_host="{/workflow/@name}"),
        )
    )
    instance, actions = launch(source, name="h")
    a, b, c, d, e, f = instance.root.findall(".//task")
    assert (a.get("status"), a.get("error")) == ("ABORTED", "Unknown queue name")
    assert b.get("host") == "h" and b.get("error") == "remote execution is not supported"
    assert d.get("error") == "remote execution is not supported"
    assert c.get("status") == e.get("status") == f.get("status") == "QUEUED"
    assert f.get("queue_host") == "h"
    assert instance.errors == 3
    _, actions = launch(workflow(job("a", task("/bin/a"))), host="remote.example")
    assert actions == [InstanceFinished(InstanceStatus.TERMINATED, 1)]


# --------------------------------------------------------------------------------------------------- evqWait


def test_evqwait_holds_a_node_until_a_task_end_makes_it_true() -> None:
    source = workflow(
        job("a", task("/bin/a1") + task("/bin/a2"))
        + job(
            "b",
            task("/bin/b"),
            condition="evqWait(count(/workflow/subjobs/job[@name='a']//task[@status='TERMINATED']) = 2)",
        )
    )
    instance, actions = launch(source)
    [b] = jobs(instance, "b")
    assert (b.get("status"), b.get("details")) == ("WAITING", "Waiting for condition to become true")
    assert instance.counters()["waiting_conditions"] == 1 and b.get("waiting_conditions") == "1"
    assert finish(instance, actions[0].evqid) == []
    assert b.get("status") == "WAITING"
    [run] = runs(finish(instance, actions[1].evqid))
    assert run.argv == ("/bin/b",)
    assert b.get("status") is None and b.get("details") == "Condition evaluates to true"
    assert instance.counters()["waiting_conditions"] == 0


def test_a_waiting_job_that_loops_once_it_may_run_leaves_no_wait_on_its_copies() -> None:
    """Its counters said it waited; the loop's copies of it do not (the autouse check: as a count from nothing)."""
    waits = "evqWait(//task[@path='/bin/a']/@status = 'TERMINATED')"
    source = workflow(
        job("a", task("/bin/a")) + job("b", task("/bin/b"), condition=waits, loop="/workflow/subjobs/job")
    )
    instance, actions = launch(source)
    assert instance.counters()["waiting_conditions"] == 1
    assert len(runs(finish(instance, actions[0].evqid))) == 2  # one b per job of the workflow: a and b
    assert [clone.get("waiting_conditions") for clone in jobs(instance, "b")] == ["0", "0"]
    assert instance.counters()["waiting_conditions"] == 0


def test_a_wait_that_never_holds_does_not_keep_the_instance_alive() -> None:
    source = workflow(job("a", task("/bin/a")) + job("b", task("/bin/b", condition="evqWait(false())")))
    instance, actions = launch(source)
    assert finish(instance, actions[0].evqid) == [InstanceFinished(InstanceStatus.TERMINATED, 0)]
    assert one_task(instance, "b").get("status") == "WAITING"


def test_a_waiting_task_that_becomes_skipped_releases_the_subjobs() -> None:
    source = workflow(
        job("a", task("/bin/a"))
        + job(
            "b",
            task(
                "/bin/b",
                condition="evqWait(/workflow/subjobs/job[@name='a']/tasks/task/@status = 'TERMINATED') and false()",
            ),
            job("after", task("/bin/after")),
        )
    )
    instance, actions = launch(source)
    [after] = runs(finish(instance, actions[0].evqid))
    assert after.argv == ("/bin/after",)
    assert one_task(instance, "b").get("status") == "SKIPPED"


# ---------------------------------------------------------------------------------------------------- retries


def test_fixed_retries_append_a_triplet_per_try() -> None:
    instance, actions = launch(
        workflow(job("a", task("/bin/a", retry_delay="5", retry_times="2"), job("c", task("/bin/c"))))
    )
    evq = actions[0].evqid
    retry = finish(instance, evq, TaskResult.exited(1, stdout=b"try 1"), NOW)
    assert retry == [RetryLater(evq, 5.0, NOW + 5)]
    element = task_of(instance, evq)
    assert (element.get("retry_times"), element.get("retry_at")) == ("1", local_time(NOW + 5))
    assert instance.counters()["retrying_tasks"] == 1 and instance.errors == 0
    assert instance.retry_due(evq + 100, NOW) == []
    [again] = instance.retry_due(evq, NOW + 5)
    assert isinstance(again, RunTask) and again.evqid == evq and element.get("status") == "QUEUED"
    assert finish(instance, evq, TaskResult.exited(1, stdout=b"try 2"), NOW + 6) == [RetryLater(evq, 5.0, NOW + 11)]
    assert element.get("retry_times") == "0"
    runs(instance.retry_due(evq, NOW + 11))
    [end] = finish(instance, evq, TaskResult.exited(1, stdout=b"try 3"), NOW + 12)
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 1)
    assert [child.tag for child in element] == ["output", "stderr", "log"] * 3
    assert [o.text for o in element.findall("output")] == ["try 1", "try 2", "try 3"]
    assert element.get("retry_at") is None


@contextlib.contextmanager
def _local_time_zone(name: str) -> Iterator[None]:
    """This process's local time is `name`'s (time.mktime and localtime read TZ) until the block ends."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def test_a_retry_due_in_the_hour_a_dst_change_repeats_is_restored_to_its_moment() -> None:
    """retry_at is evQueue's local time: "2026-10-25 02:30:00" in Paris names two moments an hour apart. A restart
    read it back with mktime, which took the later one here: a retry due at the first ran an hour late."""
    with _local_time_zone("Europe/Paris"):
        due = 1792888200.0  # 2026-10-25 00:30 UTC: 02:30 summer time, half an hour before the clocks go back
        instance, actions = launch(
            workflow(job("a", task("/bin/a", retry_delay="3600", retry_times="1"))), now=due - 3600
        )
        evq = actions[0].evqid
        assert finish(instance, evq, TaskResult.exited(1), due - 3600) == [RetryLater(evq, 3600.0, due)]
        assert task_of(instance, evq).get("retry_at") == local_time(due) == local_time(due + 3600)
        _, [pending] = restore(instance)
        assert pending.retry_at == due


def test_a_document_saved_without_retry_at_unix_is_restored_from_retry_at() -> None:
    instance, actions = launch(workflow(job("a", task("/bin/a", retry_delay="30", retry_times="1"))))
    evq = actions[0].evqid
    finish(instance, evq, TaskResult.exited(1))
    element = task_of(instance, evq)
    del element.attrib["retry-at-unix"]  # as the previous version of jobd saved it
    _, [pending] = restore(instance)
    assert pending.retry_at == time.mktime(time.localtime(NOW + 30))


def test_a_retry_that_succeeds_runs_the_subjobs() -> None:
    instance, actions = launch(
        workflow(job("a", task("/bin/a", retry_delay="1", retry_times="1"), job("c", task("/bin/c"))))
    )
    evq = actions[0].evqid
    finish(instance, evq, TaskResult.exited(1))
    instance.retry_due(evq, NOW + 1)
    [child] = runs(finish(instance, evq, TaskResult.exited(0), NOW + 2))
    assert child.argv == ("/bin/c",)
    assert instance.errors == 0


def test_retry_retval_limits_retries_to_one_exit_code() -> None:
    instance, actions = launch(
        workflow(
            job(
                "a",
                task("/bin/a", retry_delay="1", retry_times="3", retry_retval="75")
                + task("/bin/b", retry_delay="1", retry_times="3", retry_retval="75"),
            )
        )
    )
    assert finish(instance, actions[0].evqid, TaskResult.exited(75)) == [RetryLater(actions[0].evqid, 1.0, NOW + 1)]
    assert finish(instance, actions[1].evqid, TaskResult.exited(1)) == []
    assert instance.errors == 1


def test_retry_schedule_walks_its_levels() -> None:
    """evQueue observed fast_then_slow (1 s × 2, 5 s × 1): 4 runs, final level 3 and retry_times 0."""
    source = workflow(job("a", task("/bin/a", retry_schedule="fast_then_slow")))
    instance, actions = launch(source, retry_schedules={"fast_then_slow": FAST_THEN_SLOW})
    schedule = instance.root.find("schedules/schedule")
    assert schedule is not None and schedule.get("name") == "fast_then_slow"
    assert [(lv.get("retry_delay"), lv.get("retry_times")) for lv in schedule] == [("1", "2"), ("5", "1")]
    evq = actions[0].evqid
    now, delays = NOW, []
    for _ in range(3):
        [retry] = finish(instance, evq, TaskResult.exited(1), now)
        assert isinstance(retry, RetryLater)
        delays.append(retry.delay)
        now += retry.delay
        runs(instance.retry_due(evq, now))
    assert delays == [1.0, 1.0, 5.0]
    assert finish(instance, evq, TaskResult.exited(1), now) == [InstanceFinished(InstanceStatus.TERMINATED, 1)]
    element = task_of(instance, evq)
    assert (element.get("retry_schedule_level"), element.get("retry_times")) == ("3", "0")
    assert len(element.findall("output")) == 4


def test_an_undefined_retry_schedule_is_refused_at_launch() -> None:
    with pytest.raises(ConfigError, match="retry_schedule 'nope' is not a defined"):
        launch(workflow(job("a", task("/bin/a", retry_schedule="nope"))))


# ----------------------------------------------------------------------------------------------------- cancel


def test_cancel_dequeues_refuses_new_tasks_and_retries() -> None:
    source = workflow(
        job("run", task("/bin/run"), job("next", task("/bin/next")))
        + job("queued", task("/bin/queued"))
        + job("failing", task("/bin/failing", retry_delay="9", retry_times="9"))
        + job("retrying", task("/bin/retrying", retry_delay="9", retry_times="9"))
    )
    instance, actions = launch(source)
    run, queued, failing, retrying = runs(actions)
    instance.task_started(run.evqid, 1, NOW)
    instance.task_started(failing.evqid, 2, NOW)
    finish(instance, retrying.evqid, TaskResult.exited(1))
    cancelled = instance.cancel(NOW + 1)
    assert cancelled == [DequeueTask(queued.evqid)]
    assert instance.cancel(NOW + 1) == []
    assert task_of(instance, queued.evqid).get("error") == "Aborted on user request"
    assert task_of(instance, retrying.evqid).get("error") == "Aborted on user request"
    assert instance.retry_due(retrying.evqid, NOW + 9) == []
    assert instance.task_started(queued.evqid, 9, NOW + 2) == []  # its job had started anyway: ignored
    assert instance.task_ended(failing.evqid, TaskResult.exited(1), NOW + 2) == []
    assert task_of(instance, failing.evqid).get("error") == "Won't retry because workflow is cancelling"
    [end] = instance.task_ended(run.evqid, TaskResult.exited(0), NOW + 3)
    assert one_task(instance, "next").get("error") == "Aborted on user request"
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 4)
    assert instance.root.get("cancelling") == "yes"


# ------------------------------------------------------------------------------------------------ task output


def test_xml_output_is_imported_and_invalid_xml_aborts() -> None:
    source = workflow(
        job("good", task("/bin/good", output_method="XML"))
        + job("bad", task("/bin/bad", output_method="XML"), job("never", task("/bin/never")))
        + job("failed", task("/bin/failed", output_method="XML"))
    )
    instance, actions = launch(source)
    good, bad, failed = runs(actions)
    finish(instance, good.evqid, TaskResult.exited(0, stdout=b'<r><x evqid="3">1</x></r>'))
    output = task_of(instance, good.evqid).find("output")
    assert output is not None and output.get("method") == "xml"
    assert etree.tostring(output[0]) == b"<r><x>1</x></r>"  # an evqid from outside could collide: dropped
    assert finish(instance, bad.evqid, TaskResult.exited(0, stdout=b"<r>not closed")) == []
    element = task_of(instance, bad.evqid)
    assert (element.get("status"), element.get("error")) == ("ABORTED", "Invalid XML returned")
    assert element.findtext("output") == "<r>not closed"
    [end] = finish(instance, failed.evqid, TaskResult.exited(2, stdout=b"<r>"))
    assert task_of(instance, failed.evqid).find("output").get("method") == "text"  # type: ignore[union-attr]
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 2)


def test_an_xml_output_not_kept_whole_is_refused_naming_why_even_if_what_is_kept_parses() -> None:
    instance, actions = launch(
        workflow(job("a", task("/bin/a", output_method="XML")) + job("b", task("/bin/b", output_method="XML")))
    )
    cut_by_disk, cut_by_limit = runs(actions)
    # What follows the root element is lost: later tasks would read less than the program printed.
    finish(instance, cut_by_disk.evqid, TaskResult.exited(0, stdout=b"<r/>", stdout_cut=OutputCut.UNWRITTEN))
    element = task_of(instance, cut_by_disk.evqid)
    assert (element.get("status"), element.get("error")) == (
        "ABORTED",
        "Invalid XML returned (its output was cut at 4 bytes: jobd could not write the rest, its disk was full)",
    )
    finish(instance, cut_by_limit.evqid, TaskResult.exited(0, stdout=b"<r>", stdout_cut=OutputCut.MAX_OUTPUT))
    assert task_of(instance, cut_by_limit.evqid).get("error") == (
        "Invalid XML returned (its output was cut at 3 bytes: raise its max_output)"
    )


def test_doctype_in_xml_output_is_refused() -> None:
    instance, actions = launch(workflow(job("a", task("/bin/a", output_method="XML"))))
    bomb = b'<!DOCTYPE r [<!ENTITY a "aaaa">]><r>&a;</r>'
    finish(instance, actions[0].evqid, TaskResult.exited(0, stdout=bomb))
    assert task_of(instance, actions[0].evqid).get("error") == (
        "Invalid XML returned (its output has a DTD, <!DOCTYPE …> or <!ENTITY …>: jobd reads task outputs without one)"
    )


def test_control_characters_and_invalid_utf8_are_made_safe_once() -> None:
    assert xml_safe_text(b"a\x00b\xffc\x1b[0m\td\r\n\x7f") == "a\u2400b\ufffdc\u241b[0m\td\r\n\x7f"
    assert xml_safe_text("\ufffe") == "\ufffd"
    instance, actions = launch(workflow(job("a", task("/bin/a"))))
    nuls = b"\x00" * 600_000
    finish(instance, actions[0].evqid, TaskResult.exited(0, stdout=nuls, stderr=b"\xc3(", log="x\x01"))
    element = task_of(instance, actions[0].evqid)
    assert element.findtext("output") == "\u2400" * 600_000
    assert element.findtext("stderr") == "\ufffd(" and element.findtext("log") == "x\u2401"
    reparsed = safexml.parse(instance.to_xml())
    assert reparsed.findtext(".//output") == "\u2400" * 600_000


# ---------------------------------------------------------------------------------------------------- restore


def restore(instance: Instance, **options: Any) -> tuple[Instance, list[Any]]:
    options.setdefault("queues", frozenset({"default", "other"}))
    return Instance.restore(instance.to_xml(), **options)


def test_restore_round_trip_continues_where_it_stopped() -> None:
    source = workflow(
        job("exec", task("/bin/exec"), job("after", task("/bin/after")))
        + job("queued", task("/bin/queued"))
        + job("retrying", task("/bin/retrying", retry_delay="30", retry_times="1"))
        + job("lost", task("/bin/lost", retry_delay="10", retry_times="1"))
        + job("waits", task("/bin/w"), condition="evqWait(count(//task[@status='TERMINATED' and @retval=0]) > 0)")
    )
    instance, actions = launch(source)
    exe, queued, retrying, lost = runs(actions)
    instance.task_started(exe.evqid, 11, NOW)
    instance.job_assigned(queued.evqid, 12)
    finish(instance, retrying.evqid, TaskResult.exited(1))
    instance.task_started(lost.evqid, 14, NOW)
    instance.task_progress(exe.evqid, 40)

    restored, pending = restore(instance)
    assert restored.to_xml() == instance.to_xml()
    assert restored.counters() == instance.counters()
    by_id = {p.evqid: p for p in pending}
    assert (by_id[exe.evqid].status, by_id[exe.evqid].tid) == (NodeStatus.EXECUTING, 11)
    assert (by_id[queued.evqid].status, by_id[queued.evqid].tid) == (NodeStatus.QUEUED, 12)
    assert by_id[retrying.evqid].status is NodeStatus.TERMINATED
    assert by_id[retrying.evqid].retry_at == NOW + 30  # to the microsecond (retry-at-unix), not to the second
    assert by_id[lost.evqid].status is NodeStatus.EXECUTING

    # the queued task's job never reached the store: submitted again, same command
    assert restored.resubmit(queued.evqid, NOW) == [queued]
    # the lost job goes through its retry rules like any failure
    [retry] = restored.task_ended(lost.evqid, TaskResult.lost(), NOW + 1)
    assert isinstance(retry, RetryLater) and task_of(restored, lost.evqid).get("retval") == "-1"
    # a new evqid never repeats an old one; the waiting job is decided again after the next task end
    [after, waits] = runs(restored.task_ended(exe.evqid, TaskResult.exited(0), NOW + 2))
    assert after.argv == ("/bin/after",) and waits.argv == ("/bin/w",)
    assert after.evqid > max(p.evqid for p in pending) and waits.evqid > after.evqid


def test_restored_instance_stays_cancelled_and_a_finished_one_waits_for_nothing() -> None:
    instance, actions = launch(workflow(job("a", task("/bin/a"), job("b", task("/bin/b")))))
    instance.task_started(actions[0].evqid, 1, NOW)
    instance.cancel(NOW)
    restored, pending = restore(instance)
    assert restored.cancelling and [p.evqid for p in pending] == [actions[0].evqid]
    [end] = restored.task_ended(actions[0].evqid, TaskResult.exited(0), NOW)
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 1)
    assert one_task(restored, "b").get("error") == "Aborted on user request"
    again, nothing = restore(restored)
    assert nothing == [] and again.status is InstanceStatus.TERMINATED


def _lines_run_in_jobd(call: Callable[[], object]) -> int:
    """How many lines of jobd's code `call` runs (sys.settrace's line events, a loop's every turn included): a
    measure of its work that does not depend on the machine's speed."""
    lines = 0

    def local(frame: FrameType, event: str, arg: object) -> object:
        nonlocal lines
        lines += event == "line"
        return local

    def calls(frame: FrameType, event: str, arg: object) -> object:
        return local if frame.f_code.co_filename.startswith(JOBD_SOURCE) else None

    before = sys.gettrace()
    sys.settrace(calls)
    try:
        call()
    finally:
        sys.settrace(before)
    return lines


def test_evq_get_context_finds_its_node_without_walking_the_document() -> None:
    """evqGetContext() walked the whole instance document at each call: a loop of 4000 items whose tasks used it
    froze the daemon for 24 s, quadratic work (found by a soak test). It now looks in the instance's index of numbered
    nodes. The work of a loop's items is measured, not timed."""
    each = task("/bin/each", '<input name="n"><value select="evqGetCurrentJob()/evqGetContext()/@n"/></input>')
    source = workflow(
        job(
            "list",
            task("/bin/list", name="list", output_method="XML"),
            job("each", each, loop="evqGetParentJob()/evqGetOutput('list')/r/i"),
        )
    )

    def work(items: int) -> int:
        instance, actions = launch(source)
        [listing] = runs(actions)
        instance.task_started(listing.evqid, 1, NOW)
        output = b"<r>" + b"".join(b'<i n="%d"/>' % number for number in range(items)) + b"</r>"
        ended: list[Any] = []
        lines = _lines_run_in_jobd(
            lambda: ended.extend(instance.task_ended(listing.evqid, TaskResult.exited(0, stdout=output), NOW))
        )
        assert [run.argv for run in runs(ended)] == [("/bin/each", str(number)) for number in range(items)]
        return lines

    small, large = work(100), work(400)
    # Four times the items: four times the work (3.9 here), where a walk per item made it 8.6 times, and more with
    # more items (the walks grow as the square of the items, the rest as the items).
    assert large < 6 * small, (small, large)


# ------------------------------------------------------------------------------------------------ debug resume


def resume(instance: Instance, *, instance_id: int = 2, now: float = NOW + 100) -> tuple[Instance, list[Any]]:
    queues = frozenset({"default", "other"})
    return Instance.debug_resume(instance.to_xml(), instance_id=instance_id, now=now, queues=queues)


def test_debug_resume_runs_only_the_failed_task_then_its_subjobs_and_keeps_outputs() -> None:
    second = task(
        "/bin/second", '<input name="from-first"><value select="evqGetParentJob()/evqGetOutput(\'one\')"/></input>'
    )
    source = workflow(
        job("first", task("/bin/first", name="one"), job("second", second, job("third", task("/bin/third"))))
        + job("side", task("/bin/side"))
    )
    instance, actions = launch(source)
    first, side = runs(actions)
    [two] = runs(finish(instance, first.evqid, TaskResult.exited(0, stdout=b"kept")))
    assert two.argv == ("/bin/second", "kept")
    finish(instance, side.evqid)
    [end] = finish(instance, two.evqid, TaskResult.exited(3, stdout=b"bad", stderr=b"oops\n"))
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 1)
    before = instance.to_xml()

    resumed, actions = resume(instance)
    assert instance.to_xml() == before  # the old instance is not touched
    # Only the failed task runs again, with the input computed the first time (from the kept output).
    assert actions == [two]
    root = resumed.root
    assert (root.get("id"), root.get("status"), root.get("start_time")) == ("2", "EXECUTING", local_time(NOW + 100))
    assert root.get("end_time") is None and root.get("errors") == "0" and resumed.counters()["queued_tasks"] == 1
    again = task_of(resumed, two.evqid)
    assert again.get("status") == "QUEUED" and again.get("retval") is None and again.get("execution_time") is None
    assert [o.text for o in again.findall("output")] == ["bad"]  # the failed try's triplet is kept
    kept = task_of(resumed, first.evqid)
    assert (kept.get("status"), kept.get("retval"), kept.findtext("output")) == ("TERMINATED", "0", "kept")
    assert len(task_of(resumed, side.evqid).findall("output")) == 1

    [third] = runs(finish(resumed, two.evqid, TaskResult.exited(0, stdout=b"good"), now=NOW + 101))
    assert third.argv == ("/bin/third",)
    assert [(o.get("retval"), o.text) for o in again.findall("output")] == [("3", "bad"), ("0", "good")]
    assert len(again.findall("stderr")) == 2 and again.get("retval") == "0"
    [end] = finish(resumed, third.evqid, now=NOW + 102)
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 0)
    assert resumed.root.get("end_time") == local_time(NOW + 102) and resumed.root.get("errors") == "0"
    assert len(task_of(resumed, first.evqid).findall("output")) == 1  # never ran again


def test_debug_resume_reruns_cancelled_and_aborted_at_run_tasks_not_those_whose_values_failed() -> None:
    source = workflow(
        job("run", task("/bin/run"), job("next", task("/bin/next")))
        + job("queued", task("/bin/queued"))
        + job("bad-input", task("/bin/x", '<input name="i"><value select="1 div"/></input>'))
        + job("bad-condition", task("/bin/y", condition="nosuch("))
        + job("xml", task("/bin/xml", output_method="XML"))
    )
    instance, actions = launch(source)
    run, queued, xml = runs(actions)
    instance.task_started(run.evqid, 1, NOW)
    finish(instance, xml.evqid, TaskResult.exited(0, stdout=b"<unclosed>"))
    instance.cancel(NOW + 1)
    [end] = instance.task_ended(run.evqid, TaskResult.exited(0), NOW + 2)
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 5)  # queued, next, xml, bad input, bad condition

    resumed, actions = resume(instance)
    assert resumed.root.get("cancelling") is None
    rerun = runs(actions)
    assert [r.argv for r in rerun] == [("/bin/next",), ("/bin/queued",), ("/bin/xml",)]
    assert task_of(instance, queued.evqid).get("error") == "Aborted on user request"
    assert task_of(resumed, queued.evqid).get("error") is None and rerun[1].evqid == queued.evqid
    assert task_of(resumed, run.evqid).get("retval") == "0"  # succeeded: left alone
    assert one_task(resumed, "bad-input").get("status") == "ABORTED"
    assert one_task(resumed, "bad-condition").get("status") == "ABORTED"
    for action in rerun:
        finish(resumed, action.evqid, TaskResult.exited(0, stdout=b"<ok/>"), now=NOW + 101)
    assert resumed.status is InstanceStatus.TERMINATED and resumed.errors == 2


def test_debug_resume_of_an_instance_jobd_ended_runs_again_its_executing_and_retrying_tasks() -> None:
    """An instance jobd ended by an error of its own (Instances._broken) keeps the tasks that were under way as they
    were: EXECUTING, QUEUED, waiting for a retry. Resumed, the EXECUTING one was copied as it was, with no job
    behind it, and the new instance never ended, not even when cancelled (found by a soak test)."""
    source = workflow(
        job("running", task("/bin/running"), job("after", task("/bin/after")))
        + job("queued", task("/bin/queued"))
        + job("retrying", task("/bin/retrying", retry_delay="60", retry_times="1"))
    )
    instance, actions = launch(source)
    running, queued, retrying = runs(actions)
    instance.task_started(running.evqid, 1, NOW)
    [later] = finish(instance, retrying.evqid, TaskResult.exited(1))
    assert isinstance(later, RetryLater)
    instance.ended_by_jobd(NOW + 1, instance.errors + 1)
    assert task_of(instance, running.evqid).get("status") == "EXECUTING"

    resumed, actions = resume(instance)
    rerun = runs(actions)
    assert [r.argv for r in rerun] == [("/bin/running",), ("/bin/queued",), ("/bin/retrying",)]
    for action in rerun:
        again = task_of(resumed, action.evqid)
        assert again.get("status") == "QUEUED", etree.tostring(again)
        assert (again.get("tid"), again.get("pid"), again.get("retry_at")) == (None, None, None)
    [after] = runs(finish(resumed, running.evqid, now=NOW + 101))
    finish(resumed, queued.evqid, now=NOW + 101)
    finish(resumed, retrying.evqid, now=NOW + 101)
    [end] = finish(resumed, after.evqid, now=NOW + 102)
    assert end == InstanceFinished(InstanceStatus.TERMINATED, 0)


def test_debug_resume_of_a_successful_instance_ends_at_once_and_an_executing_one_is_refused() -> None:
    instance, actions = launch(workflow(job("a", task("/bin/a"))))
    with pytest.raises(ValueError, match="TERMINATED"):
        resume(instance)
    finish(instance, actions[0].evqid)
    resumed, actions = resume(instance)
    assert actions == [InstanceFinished(InstanceStatus.TERMINATED, 0)]
    assert resumed.root.get("id") == "2" and resumed.root.get("end_time") == local_time(NOW + 100)


def test_task_result_constructors() -> None:
    assert TaskResult.lost().outcome is Outcome.LOST and TaskResult.lost().retval == -1
    assert TaskResult.killed(15).signal == 15 and TaskResult.killed(15).retval == -1
    assert TaskResult.exited(255).retval == 255


def test_copied_nodes_lose_their_evqids_and_are_not_counted() -> None:
    source = workflow(
        job("a", task("/bin/a"), job("b", task("/bin/b", '<stdin><copy select="evqGetParentJob()"/></stdin>')))
    )
    instance, actions = launch(source)
    [run] = runs(finish(instance, actions[0].evqid))
    copied = task_of(instance, run.evqid).find("stdin/job")
    assert copied is not None and copied.get("name") == "a"
    assert all(element.get("evqid") is None for element in copied.iter())
    assert b"<task " in (run.stdin or b"")
    assert instance.counters()["running_tasks"] == 1  # the copied, TERMINATED task of job a is not a task here
    numbers = [e.get("evqid") for e in instance.root.iter() if isinstance(e.tag, str) and e.get("evqid")]
    assert len(numbers) == len(set(numbers))


def test_progress_is_clamped_and_100_at_the_end() -> None:
    instance, actions = launch(workflow(job("a", task("/bin/a"))))
    evq = actions[0].evqid
    instance.task_started(evq, 1, NOW)
    instance.task_progress(evq, 250)
    assert task_of(instance, evq).get("progression") == "100"
    instance.task_progress(evq, -3)
    assert task_of(instance, evq).get("progression") == "0"
    instance.task_ended(evq, TaskResult.exited(0), NOW)
    assert task_of(instance, evq).get("progression") == "100" and task_of(instance, evq).get("tid") is None
    instance.task_progress(evq, 10)  # late progress of an ended task changes nothing
    assert task_of(instance, evq).get("progression") == "100"


def test_a_copy_that_would_nest_the_document_deeper_than_parsers_read_aborts_its_task() -> None:
    """An output that fits where it is stored (249 levels under a top-level job's task) was copied whole into the
    input of a subjob's task, two levels deeper: the instance document could no longer be read back (libxml2 reads
    256 levels), by a restart, instance.get or evQueue's `instance query`. Found with a soak test's deep outputs."""
    copy = "<input><copy select=\"evqGetParentJob()/evqGetOutput('deep')/*\"/></input>"
    source = workflow(job("a", task("/bin/deep", name="deep", output_method="XML"), job("b", task("/bin/b", copy))))
    instance, actions = launch(source)
    output = b"<a>" * 249 + b"</a>" * 249
    assert runs(finish(instance, actions[0].evqid, TaskResult.exited(0, stdout=output))) == []
    assert task_of(instance, actions[0].evqid).get("status") == "TERMINATED"
    [copier] = jobs(instance, "b")[0].iter("task")
    assert copier.get("status") == "ABORTED", etree.tostring(copier)
    assert copier.get("error", "").startswith(
        "Error computing input value : <copy select> took elements that nest 249 deep, where they can nest 247"
    )
    assert instance.errors == 1
    safexml.parse(instance.to_xml())  # what is kept reads back, evQueue's <response> around it too
    safexml.parse(b"<response>" + instance.to_xml() + b"</response>")
