"""evQueue's XML commands, answered by the same engine as the JSON-RPC methods.

A connection hands `EvQueue.answer` one framed request document and gets back the bytes to send, a coroutine that
produces them for a command that waits (a synchronous `instance launch`, `instance wait`), or `None` for `<quit/>`
(close without an answer). Decoding and the response format are `jobd.protocol.evqueue`'s. Who may do what is
`check_rights` (before a command runs: `RIGHTS` names the check of every command, and a command it does not name is
for admins only), plus the handlers of lists, which show non-admins only what they may read (`jobd.engine.access`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from lxml import etree

from jobd import __version__, audit, forked, safexml
from jobd.api import UNKNOWN_NAME, Api, as_seen_by, check_instance, check_launch, once_durable, while_allowed
from jobd.engine import access
from jobd.engine.schedule import Calendar
from jobd.engine.workflow import retry_levels
from jobd.errors import (
    InsufficientRights,
    InvalidParams,
    JobdError,
    ShuttingDown,
    TimedOut,
    UnknownInstance,
    UnknownWorkflow,
    memory_shortage,
)
from jobd.model import InstanceSummary, ObjectKind, Right, Scheduler, WorkflowDef
from jobd.peer import Peer
from jobd.protocol import evqueue as xml
from jobd.store import InstanceFilter, refused_request

log = logging.getLogger("jobd.evqueue")

MAX_GROUPED_INSTANCES: Final = 100_000  # instances read to count `instances list groupby=…` rows

TERMINATED: Final = "TERMINATED"
EXECUTING: Final = "EXECUTING"
# The memory an xpathfilter's evaluation may take beyond the copy of jobd it runs in (a real filter takes a few KiB).
XPATHFILTER_MEMORY: Final = 256 * 1024 * 1024


class _QuitSentinel:
    """What the `quit` handler returns: close the connection, answer nothing."""


QUIT: Final = _QuitSentinel()

Result = etree._Element | Coroutine[Any, Any, etree._Element] | _QuitSentinel
Answer = bytes | Coroutine[Any, Any, bytes] | None


@dataclasses.dataclass
class Statistics:
    """evQueue's `statistics query type="global"` counters that mean something in jobd (since it started)."""

    accepted_api_connections: int = 0
    current_api_connections: int = 0
    api_queries: int = 0
    api_exceptions: int = 0
    workflow_queries: int = 0
    workflow_status_queries: int = 0
    workflow_cancel_queries: int = 0
    statistics_queries: int = 0
    workflow_exceptions: int = 0  # launches refused (an unknown workflow, wrong parameters, …)
    waiting_threads: int = 0  # requests waiting right now (synchronous launches, instance waits)


class EvQueue:
    """The XML protocol's side of the API: one per server, shared by its XML connections."""

    def __init__(self, api: Api, node: str | None = None) -> None:
        self.api = api
        self.node = node or socket.gethostname()
        self.statistics = Statistics()

    def greeting(self, peer: Peer) -> bytes:
        """The `<ready …>` an evQueue client waits for before it sends anything."""
        profile = "ADMIN" if peer.is_admin else "USER"
        return xml.greeting(self.node, profile, __version__, datetime.now())

    def connected(self) -> None:
        self.statistics.accepted_api_connections += 1
        self.statistics.current_api_connections += 1

    def disconnected(self) -> None:
        self.statistics.current_api_connections -= 1

    def error(self, failure: JobdError) -> bytes:
        self.statistics.api_exceptions += 1
        return xml.response_error(self.node, failure)

    def answer(self, peer: Peer, document: bytes) -> Answer:
        """The answer to one request document (see the module docstring)."""
        self.statistics.api_queries += 1
        xpathfilter: str | None = None
        try:
            request = xml.parse_request(document)
            xpathfilter = request.xpathfilter
            target = audit.XML_MUTATING.get((request.group, request.action))
            if target is None:  # read-only: not audited
                result = self._execute(peer, request)
            else:  # the one place every mutating command is audited, refusals and bad attributes included
                result = audit.call_xml(
                    self.api.engine.store,
                    peer,
                    f"{request.group} {request.action}",
                    target,
                    request.attributes,
                    lambda: self._execute(peer, request),
                )
            if isinstance(result, _QuitSentinel):
                return None
            if isinstance(result, Coroutine):
                return self._answer_later(result, xpathfilter)
            if xpathfilter is not None:
                return self._filtered_later(result, xpathfilter)
            return xml.serialize(result)
        except JobdError as failure:
            return self.error(failure)
        except Exception as failure:  # the request boundary: a bug is logged and answered, never fatal
            return self._internal_error(failure)

    def _execute(self, peer: Peer, request: xml.Request) -> Result:
        command = xml.decode_command(request)
        check_rights(self.api, peer, command)
        try:
            return HANDLERS[type(command)](self, peer, command)
        except UNKNOWN_NAME as error:
            raise as_seen_by(self.api, peer, error) from None

    async def _answer_later(self, result: Coroutine[Any, Any, etree._Element], xpathfilter: str | None) -> bytes:
        self.statistics.waiting_threads += 1
        try:
            root = await result
        except JobdError as failure:
            return self.error(failure)
        except Exception as failure:
            return self._internal_error(failure)
        finally:
            self.statistics.waiting_threads -= 1
        return xml.serialize(root) if xpathfilter is None else await self._filtered_later(root, xpathfilter)

    async def _filtered_later(self, root: etree._Element, xpathfilter: str) -> bytes:
        """The answer `root` filtered by `xpathfilter`, evaluated in a child process (jobd/forked.py): libxml2's
        string functions and comparisons can be made to run for minutes in C, where nothing in the loop can stop
        them, and to take gigabytes (concat() of the whole response a thousand times)."""
        try:
            return await forked.run(
                lambda: xml.serialize(xml.apply_xpathfilter(root, xpathfilter)),
                seconds=xml.XPATHFILTER_SECONDS,
                memory=XPATHFILTER_MEMORY,
            )
        except forked.TooLong:
            return self.error(xml.xpathfilter_refused(xpathfilter, xml.TOO_SLOW))
        except forked.Refused as refusal:  # apply_xpathfilter's own refusal (an invalid expression), or a MemoryError
            return self.error(InvalidParams(str(refusal), parameter="xpathfilter"))
        except forked.Faulted as fault:  # a bug in jobd's filtering, not the client's mistake: logged as one
            log.error("internal error filtering an evQueue answer by xpathfilter %r\n%s", xpathfilter, fault.traceback)
            return self.error(JobdError(f"internal error: {fault}"))
        except forked.Failed as failure:
            return self.error(xml.xpathfilter_refused(xpathfilter, f"could not be evaluated ({failure})"))
        except JobdError as failure:  # no process could be made for it now
            return self.error(failure)

    def _internal_error(self, failure: Exception) -> bytes:
        if (store_failed := refused_request("evQueue request", failure)) is not None:
            self.api.engine.write_refused("evQueue request", store_failed)
            return self.error(store_failed)
        if (short := memory_shortage(failure)) is not None:
            return self.error(short)
        log.error("internal error answering an evQueue request", exc_info=failure)
        return self.error(JobdError(f"internal error: {type(failure).__name__}: {failure}"))

    def ok(
        self,
        attrs: Mapping[str, xml.AttributeValue] | None = None,
        children: Iterable[etree._Element] = (),
        text: str | None = None,
    ) -> etree._Element:
        return xml.response_element(self.node, attrs or {}, children, text)


# -- rights ------------------------------------------------------------------------------------------------------

Check = Callable[[Api, Peer, Any], None]


def _anyone(api: Api, peer: Peer, command: xml.Command) -> None:
    """Commands about no object (ping, quit, global counters), and lists filtered by their handlers."""


def _launch(api: Api, peer: Peer, command: xml.InstanceLaunch) -> None:
    check_launch(api, peer, command.name, command.host, command.user)


def _on_instance(*rights: Right) -> Check:
    def check(api: Api, peer: Peer, command: Any) -> None:
        for right in rights:
            check_instance(api, peer, right, command.instance_id)

    return check


def _require_readable_id(peer: Peer, kind: str, wanted: int, readable: int) -> None:
    """Ids number only the objects of `kind` the peer may read (`readable` of them): one past them names none it
    may see, and is refused as a name it may not read is, rights before names (the unknown id is the admins')."""
    if not peer.is_admin and not 1 <= wanted <= readable:
        raise InsufficientRights(
            f"{access.who(peer)} may not read {kind} id {wanted}: the read right is missing",
            missing=str(Right.READ),
            kind=kind,
        )


def _workflow_get(api: Api, peer: Peer, command: xml.WorkflowGet) -> None:
    name = command.name
    if name is None and command.workflow_id is not None:
        _require_readable_id(peer, "workflow", command.workflow_id, len(_workflows(api, peer)))
        return
    if name is not None:
        access.require(api.engine.config.access, peer, Right.READ, ObjectKind.WORKFLOW, name)


def _queue_get(api: Api, peer: Peer, command: xml.QueueGet) -> None:
    queues = api.engine.config.queues
    _require_readable_id(peer, "queue", command.queue_id, len(_readable_names(api, peer, ObjectKind.QUEUE, queues)))


# The check of every command (evQueue's rights, reference/evqueue.md §1.6 and §6). Not listed: admins only.
RIGHTS: Final[Mapping[type, Check]] = {
    xml.Ping: _anyone,
    xml.Quit: _anyone,
    xml.InstanceLaunch: _launch,
    xml.InstanceQuery: _on_instance(Right.READ),
    xml.InstanceWait: _on_instance(Right.READ),
    xml.InstanceCancel: _on_instance(Right.KILL),
    xml.InstanceKillTask: _on_instance(Right.KILL),
    xml.InstanceDebugResume: _on_instance(Right.READ, Right.EXEC),
    xml.InstancesList: _anyone,  # filtered: instances of workflows the peer may read
    xml.StatusWorkflows: _anyone,  # filtered, as instances list
    xml.StatisticsGlobal: _anyone,
    xml.StatisticsQueues: _anyone,  # filtered: queues the peer may read
    xml.QueuePoolList: _anyone,  # filtered, as statistics queue
    xml.WorkflowsList: _anyone,  # filtered: workflows the peer may read
    xml.WorkflowGet: _workflow_get,
    xml.QueueGet: _queue_get,  # as queuepool list: the queues the peer may read
}

_ADMIN_ONLY_WHAT: Final[Mapping[type, str]] = {
    xml.InstanceDelete: "delete instances",
    xml.StatusScheduler: "see the scheduler's state",
    xml.StatusConfiguration: "see the configuration",
    xml.WorkflowSchedulesList: "list workflow schedules",
    xml.WorkflowScheduleGet: "see a workflow schedule",
    xml.RetrySchedulesList: "list retry schedules",
    xml.RetryScheduleGet: "see a retry schedule",
    xml.ProcessManagerTail: "read the output of a task with processmanager tail",
    xml.ControlReload: "reload the configuration",
}


def check_rights(api: Api, peer: Peer, command: xml.Command) -> None:
    """Refuse what `peer` may not do, before the command runs; admins may do everything."""
    check = RIGHTS.get(type(command))
    if check is not None:
        check(api, peer, command)
        return
    what = _ADMIN_ONLY_WHAT.get(type(command), f"use the command {type(command).__name__}")
    access.require_admin(peer, what)


def _may_read(service: EvQueue, peer: Peer, kind: ObjectKind, name: str) -> bool:
    return access.may(service.api.engine.config.access, peer, Right.READ, kind, name)


# -- formatting --------------------------------------------------------------------------------------------------


def local_time(timestamp: float | None) -> str:
    """evQueue's timestamps: local time `YYYY-MM-DD HH:MM:SS`; empty for a time not reached yet."""
    if timestamp is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _summary_attrs(summary: InstanceSummary) -> dict[str, xml.AttributeValue]:
    return {
        "id": summary.id,
        "name": summary.workflow,
        "status": summary.status,
        "start_time": local_time(summary.started_at),
        "end_time": local_time(summary.ended_at),
        "errors": summary.errors,
        "comment": summary.comment or "",
        "host": summary.host or "",
    }


def _workflows(api: Api, peer: Peer) -> list[WorkflowDef]:
    """The workflows `peer` may read, in the order their ids number them: by name. evQueue's ids are database ids;
    jobd's workflows are files, so an id is a position by name, and changes when workflows are added or removed
    (or the peer's grants change). A position among the workflows the peer may read, not among all: then the gaps
    between its ids would tell how many workflows it may not see sort before each of its own."""
    return [
        api.engine.config.workflows[name]
        for name in _readable_names(api, peer, ObjectKind.WORKFLOW, api.engine.config.workflows)
    ]


def _readable_names(api: Api, peer: Peer, kind: ObjectKind, names: Iterable[str]) -> list[str]:
    """The `names` of `kind` that `peer` may read, sorted: what evQueue's ids number, 1 for the first."""
    rules = api.engine.config.access
    return [name for name in sorted(names) if access.may(rules, peer, Right.READ, kind, name)]


def _workflow_attrs(workflow_id: int, workflow: WorkflowDef) -> dict[str, xml.AttributeValue]:
    # group and comment: those of evQueue's git file, if the workflow is one; jobd has no git, hence no last commit.
    return {
        "id": workflow_id,
        "name": workflow.name,
        "group": workflow.group,
        "comment": workflow.comment,
        "lastcommit": "",
    }


def _definition(workflow: WorkflowDef) -> etree._Element:
    return safexml.parse(workflow.source, workflow.path)


# -- handlers ----------------------------------------------------------------------------------------------------


def ping(service: EvQueue, peer: Peer, command: xml.Ping) -> Result:
    uptime = service.api.daemon.status().get("uptime_seconds", 0)
    return service.ok({"version": __version__, "git-support": "disabled", "uptime": int(uptime)})


def quit_(service: EvQueue, peer: Peer, command: xml.Quit) -> Result:
    return QUIT


def instance_launch(service: EvQueue, peer: Peer, command: xml.InstanceLaunch) -> Result:
    service.statistics.workflow_queries += 1  # as evQueue counts them: every launch asked for
    try:
        instance_id = service.api.instances.launch(
            command.name,
            command.parameters,
            comment=command.comment,
            host=command.host,
            user=command.user,
            launched_by=peer.uid,
        )
    except JobdError:
        service.statistics.workflow_exceptions += 1
        raise
    if not command.synchronous:
        return once_durable(service.api.engine, service.ok({"workflow-instance-id": instance_id}))
    return _launched_and_ended(service, peer, command, instance_id, service.api.engine.next_reload())


async def _launched_and_ended(
    service: EvQueue, peer: Peer, command: xml.InstanceLaunch, instance_id: int, since: asyncio.Future[None]
) -> etree._Element:
    """The answer to a synchronous launch, once its instance has ended. `since`: the next reload as it was when the
    launch was checked, whose right is checked again at each reload from then on, during the fsync too."""
    api = service.api
    if api.engine.replies_wait_for_fsync:
        # The launch itself, whatever the wait then sees: its id is told, to a client refused meanwhile too, only
        # once the launch survives a power cut.
        await api.engine.made_durable()
    attrs: dict[str, xml.AttributeValue] = {"workflow-instance-id": instance_id}
    try:
        # Checked as an instance wait's right is (with the peer as the new configuration sees it).
        summary = await while_allowed(
            api,
            api.instances.wait(instance_id, command.timeout),
            lambda: check_launch(api, peer.under(api.engine.config.access), command.name, command.host, command.user),
            since,
        )
    except InsufficientRights:
        # A reload took the right away: the client is no longer told when its instance ends. It launched it, and is
        # answered as a wait that did not see the end is: the id, and that the instance may still be running.
        attrs["wait"] = "timedout"
        return service.ok(attrs)
    except ShuttingDown:
        # jobd stops before the instance has ended. The launch is committed (the next start resumes it): answered
        # KO, without its id, a client that launched again made a second instance. evQueue's answer for a wait
        # that did not see the end tells the id and that the instance may still be running.
        attrs["wait"] = "timedout"
        return service.ok(attrs)
    if summary.status != TERMINATED:
        attrs["wait"] = "timedout"
    return service.ok(attrs)


def instance_query(service: EvQueue, peer: Peer, command: xml.InstanceQuery) -> Result:
    service.statistics.workflow_status_queries += 1
    document = service.api.instances.document(command.instance_id)
    return service.ok(children=[safexml.parse(document, f"instance {command.instance_id}")])


def instance_wait(service: EvQueue, peer: Peer, command: xml.InstanceWait) -> Result:
    # evQueue answers UNKNOWN_INSTANCE for an instance that has already ended, so a client that launches and then
    # waits races the instance; jobd answers at once that it has ended.
    if service.api.instances.summary(command.instance_id).status == TERMINATED:
        return service.ok()
    return _ended(service, peer, command.instance_id, command.timeout, service.api.engine.next_reload())


async def _ended(
    service: EvQueue, peer: Peer, instance_id: int, timeout: int | None, since: asyncio.Future[None]
) -> etree._Element:
    api = service.api
    # Checked again at each reload since the command was (as JSON-RPC's instance.wait), with the peer as the new
    # configuration sees it: an admin no longer one is refused what it may not read. This coroutine first runs in
    # a later turn of the loop than the check, and a reload may come in between.
    summary = await while_allowed(
        api,
        api.instances.wait(instance_id, timeout),
        lambda: check_instance(api, peer.under(api.engine.config.access), Right.READ, instance_id),
        since,
    )
    if summary.status != TERMINATED:
        raise TimedOut(f"Instance {instance_id} did not end within {timeout} seconds", id=instance_id)
    return service.ok()


def instance_cancel(service: EvQueue, peer: Peer, command: xml.InstanceCancel) -> Result:
    service.statistics.workflow_cancel_queries += 1
    try:
        service.api.instances.cancel(command.instance_id)
    except InvalidParams as refusal:
        raise _as_evqueue_refuses(service, command.instance_id, refusal, served=EXECUTING) from None
    return service.ok()


def instance_killtask(service: EvQueue, peer: Peer, command: xml.InstanceKillTask) -> Result:
    try:
        service.api.instances.kill_task(command.instance_id, command.pid)
    except InvalidParams as refusal:
        raise _as_evqueue_refuses(service, command.instance_id, refusal, served=EXECUTING) from None
    return service.ok()


def instance_delete(service: EvQueue, peer: Peer, command: xml.InstanceDelete) -> Result:
    try:
        service.api.instances.delete(command.instance_id)
    except InvalidParams as refusal:
        raise _as_evqueue_refuses(service, command.instance_id, refusal, served=TERMINATED) from None
    return service.ok()


def _as_evqueue_refuses(service: EvQueue, instance_id: int, refusal: InvalidParams, served: str) -> JobdError:
    """What the engine's refusal of a cancel, a killtask or a delete is answered. evQueue looks the instance of a
    cancel or a killtask up among its running instances only, and that of a delete among the ended ones only
    (`served`), so an instance in the other state is UNKNOWN_INSTANCE to it, where jobd's engine refuses it with
    INVALID_PARAMS (JSON-RPC's answer). Any other refusal (a pid no task of the instance runs as) is answered as
    the engine said it."""
    status = service.api.instances.summary(instance_id).status
    if status == served:
        return refusal
    state = "it is still executing" if status == EXECUTING else f"it has already ended ({status})"
    return UnknownInstance(f"Unknown workflow instance {instance_id}: {state}", id=instance_id)


def instance_debugresume(service: EvQueue, peer: Peer, command: xml.InstanceDebugResume) -> Result:
    instance_id = service.api.instances.debug_resume(command.instance_id, launched_by=peer.uid)
    return once_durable(service.api.engine, service.ok({"workflow-instance-id": instance_id}))


def _seconds(moment: datetime) -> float:
    """Unix time of a naive datetime, read as local time as evQueue sends it. A date the platform cannot place
    (`0001-01-01`, whose local time would fall in year 0) lies before, or after, every instance."""
    try:
        return moment.timestamp()
    except (ValueError, OverflowError):
        return -math.inf if moment.year < 1970 else math.inf


def _timestamp(moment: datetime | None) -> float | None:
    return None if moment is None else _seconds(moment)


def _until(moment: datetime | None) -> float | None:
    """The end of the second `moment` names: evQueue's times are whole seconds (the times jobd shows are cut to the
    second), so `filter_…_until` with the time a row shows must keep that row, whatever fraction jobd holds."""
    return None if moment is None else math.nextafter(_seconds(moment) + 1, -math.inf)


def instances_list(service: EvQueue, peer: Peer, command: xml.InstancesList) -> Result:
    if (
        command.filter_schedule_id is not None  # instances do not record the schedule that launched them
        or command.filter_tag_id is not None  # jobd's tags are labels, with no ids
        or command.filter_node not in (None, service.node)  # jobd is one node
    ):
        return service.ok({"rows": 0})
    where = InstanceFilter(
        ids=() if command.filter_id is None else (command.filter_id,),
        workflow=command.filter_workflow,
        status=None if command.filter_status is None else command.filter_status.value,
        launched_from=_timestamp(command.filter_launched_from),
        launched_until=_until(command.filter_launched_until),
        ended_from=_timestamp(command.filter_ended_from),
        ended_until=_until(command.filter_ended_until),
        error=command.filter_error,
        parameters=command.parameters,
        custom_attributes=command.custom_attributes,
        limit=command.limit,
        offset=command.offset,
        visible_workflows=access.glob_patterns(service.api.engine.config.access, peer, Right.READ, ObjectKind.WORKFLOW),
        by_end=True,  # evQueue: ORDER BY workflow_instance_end DESC
    )
    if command.groupby is not None:
        return _grouped(service, where, command.groupby)
    summaries, total = service.api.instances.list_instances(where)
    rows = []
    for summary in summaries:
        # No schedule_id: evQueue writes it only for an instance a schedule launched, and jobd's instances do not
        # record the schedule that launched them (an empty one would tell a client every instance was scheduled).
        row = xml.element("workflow", {**_summary_attrs(summary), "node_name": service.node})
        tags = etree.SubElement(row, "tags")
        tags.extend(xml.element("tag", {"label": label}) for label in summary.tags)
        rows.append(row)
    return service.ok({"rows": total}, rows)


_STRUCT_TIME: Final = {"year": "tm_year", "month": "tm_mon", "day": "tm_mday", "hour": "tm_hour"}
_STRFTIME: Final = {"year": "%Y", "month": "%m", "day": "%d", "hour": "%H"}
_GROUP_FIELDS: Final = {
    xml.GroupBy.YEAR: ("year",),
    xml.GroupBy.MONTH: ("year", "month"),
    xml.GroupBy.DAY: ("year", "month", "day"),
    xml.GroupBy.HOUR: ("year", "month", "day", "hour"),
}


async def _grouped(service: EvQueue, where: InstanceFilter, groupby: xml.GroupBy) -> etree._Element:
    """Instances counted per workflow and start hour/day/month/year (local time); `limit`/`offset` page groups."""
    counted = dataclasses.replace(where, limit=MAX_GROUPED_INSTANCES, offset=0)
    fields = _GROUP_FIELDS[groupby]
    instances = service.api.instances
    by_period = await instances.count_instance_starts(counted, " ".join(_STRFTIME[name] for name in fields))
    counts: dict[tuple[str, tuple[int, ...]], int] = {}
    if by_period is not None:
        for (workflow, period), count in by_period.items():
            counts[(workflow, tuple(int(part) for part in period.split()))] = count
    else:  # more match than evQueue counts: its first ones in its order, read and counted here
        for workflow, started_at in await instances.read_instance_starts(counted):
            start = time.localtime(started_at)
            key = (workflow, tuple(getattr(start, _STRUCT_TIME[name]) for name in fields))
            counts[key] = counts.get(key, 0) + 1
    groups = sorted(counts.items(), key=lambda item: (item[0][1], item[0][0]), reverse=True)
    page = groups[where.offset : where.offset + where.limit]
    rows = [
        xml.element(
            "workflow",
            {"name": name, "node_name": service.node, "count": count, **dict(zip(fields, period, strict=True))},
        )
        for (name, period), count in page
    ]
    return service.ok({"rows": len(groups)}, rows)


def status_workflows(service: EvQueue, peer: Peer, command: xml.StatusWorkflows) -> Result:
    running = sorted(
        (s for s in service.api.instances.running() if _may_read(service, peer, ObjectKind.WORKFLOW, s.workflow)),
        key=lambda summary: summary.id,
    )
    shown = running if command.limit is None else running[: command.limit]
    rows = [
        xml.element("workflow", {**_summary_attrs(summary), "end_time": None, **summary.counters}) for summary in shown
    ]
    return service.ok({"count": len(running)}, rows)


def _workflow_schedules(api: Api) -> list[dict[str, Any]]:
    """The schedules of workflows (evQueue has no task schedules) in the order their ids number them: by name, as
    for workflows (a `[schedule.NAME]` is a config section, not a database row)."""
    return [schedule for schedule in api.scheduler.list() if schedule["target"]["kind"] == "workflow"]


def _timestamp_of(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def status_scheduler(service: EvQueue, peer: Peer, command: xml.StatusScheduler) -> Result:
    """What evQueue's scheduler holds: each active workflow schedule with its next time, or `running` and the
    instance while its run goes."""
    status = xml.element("status")
    for number, schedule in enumerate(_workflow_schedules(service.api), start=1):
        attrs: dict[str, xml.AttributeValue] = {"workflow_schedule_id": number, "name": schedule["target"]["name"]}
        # Instances only: a job still going from before a reload turned a task schedule into this one has an id
        # of its own numbering, which as an instance id would name another instance.
        instances = [run["id"] for run in schedule["runs"] if run["kind"] == "instance"]
        if instances:
            attrs.update(scheduled_at="running", workflow_instance_id=max(instances))
        elif schedule["running"] and schedule["next_run"] is None:
            attrs["scheduled_at"] = "running"  # that job's end is waited for (overlap skip)
        elif schedule["next_run"] is not None:
            attrs["scheduled_at"] = local_time(_timestamp_of(schedule["next_run"]))
        else:
            continue  # disabled or suspended: not in the scheduler
        status.append(xml.element("workflow", attrs))
    return service.ok(children=[status])


def status_configuration(service: EvQueue, peer: Peer, command: xml.StatusConfiguration) -> Result:
    """The running configuration as evQueue's name/value entries: the [daemon] settings and the queues. Tasks are
    left out: their environments may hold secrets."""
    config = service.api.engine.config
    entries: list[tuple[str, object]] = []
    for setting in dataclasses.fields(config.daemon):
        value = getattr(config.daemon, setting.name)
        if dataclasses.is_dataclass(value):
            entries += [
                (f"daemon.{setting.name}.{sub.name}", getattr(value, sub.name)) for sub in dataclasses.fields(value)
            ]
        else:
            entries.append((f"daemon.{setting.name}", value))
    for name, queue in config.queues.items():
        entries += [(f"queue.{name}.concurrency", queue.concurrency), (f"queue.{name}.scheduler", queue.scheduler)]
    configuration = xml.element("configuration")
    configuration.extend(
        xml.element("entry", {"name": name, "value": "" if value is None else str(value)}) for name, value in entries
    )
    return service.ok(children=[configuration])


def statistics_global(service: EvQueue, peer: Peer, command: xml.StatisticsGlobal) -> Result:
    service.statistics.statistics_queries += 1
    counters: dict[str, xml.AttributeValue] = dict(dataclasses.asdict(service.statistics))
    counters.update(
        accepted_ws_connections=0,
        current_ws_connections=0,
        ws_queries=0,
        ws_events=0,
        ws_subscriptions=0,
        workflow_instance_executing=len(service.api.instances.running()),
        # evQueue counts every instance started, however (schedules, debug resumes, …), and every instance that
        # ended with errors, since it started: so does jobd (Instances counts them).
        workflow_instance_launched=service.api.instances.launched,
        workflow_instance_errors=service.api.instances.ended_with_errors,
    )
    return service.ok(children=[xml.element("statistics", counters)])


def _evqueue_scheduler(scheduler: Scheduler) -> str:
    return "fifo" if scheduler is Scheduler.FIFO else "prio"


def statistics_queues(service: EvQueue, peer: Peer, command: xml.StatisticsQueues) -> Result:
    service.statistics.statistics_queries += 1
    statistics = xml.element("statistics")
    statistics.extend(
        xml.element(
            "queue",
            {
                "name": queue.name,
                "concurrency": queue.definition.concurrency,
                "size": queue.ready_count(),
                "running_tasks": len(queue.running),
                "scheduler": _evqueue_scheduler(queue.definition.scheduler),
            },
        )
        for queue in service.api.engine.queue_list()
        if _may_read(service, peer, ObjectKind.QUEUE, queue.name)
    )
    return service.ok(children=[statistics])


def _queue_rows(service: EvQueue, peer: Peer) -> list[etree._Element]:
    """`queuepool list`'s rows, which `queue get id=…` answers one of. Queue ids number the configured queues by
    name (queues are TOML, not database rows): those the peer may read, as workflow ids (_workflows)."""
    queues = service.api.engine.config.queues
    return [
        xml.element(
            "queue",
            {
                "id": number,
                "name": name,
                "concurrency": queues[name].concurrency,
                "scheduler": _evqueue_scheduler(queues[name].scheduler),
                "dynamic": "no",
            },
        )
        for number, name in enumerate(_readable_names(service.api, peer, ObjectKind.QUEUE, queues), start=1)
    ]


def _numbered(rows: list[etree._Element], wanted: int, what: str, listed_by: str) -> etree._Element:
    """The row of `rows` whose id is `wanted` (ids number them from 1), or evQueue's UNKNOWN_OBJECT."""
    if 1 <= wanted <= len(rows):
        return rows[wanted - 1]
    known = f"ids 1 to {len(rows)}" if rows else "none"
    raise xml.UnknownObject(f"Unknown {what} id {wanted}; {listed_by} lists {known}", parameter="id")


def queuepool_list(service: EvQueue, peer: Peer, command: xml.QueuePoolList) -> Result:
    return service.ok(children=_queue_rows(service, peer))


def queue_get(service: EvQueue, peer: Peer, command: xml.QueueGet) -> Result:
    """evQueue's `<queue id name concurrency scheduler dynamic/>`, as `queuepool list` shows it."""
    return service.ok(children=[_numbered(_queue_rows(service, peer), command.queue_id, "queue", "queuepool list")])


def workflows_list(service: EvQueue, peer: Peer, command: xml.WorkflowsList) -> Result:
    rows = []
    for number, workflow in enumerate(_workflows(service.api, peer), start=1):  # `workflow get id=…` finds it
        attrs = _workflow_attrs(number, workflow)
        if command.full:
            row = _definition(workflow)
            for name, value in attrs.items():
                row.set(name, str(value))
        else:
            row = xml.element("workflow", attrs)
        rows.append(row)
    return service.ok(children=rows)


def workflow_get(service: EvQueue, peer: Peer, command: xml.WorkflowGet) -> Result:
    workflows = _workflows(service.api, peer)
    for number, workflow in enumerate(workflows, start=1):
        if number == command.workflow_id or workflow.name == command.name:
            wrapper = xml.element(
                "workflow", {k: v for k, v in _workflow_attrs(number, workflow).items() if k != "lastcommit"}
            )
            wrapper.append(_definition(workflow))
            return service.ok(children=[wrapper])
    wanted = f"id {command.workflow_id}" if command.name is None else f"name : {command.name}"
    raise UnknownWorkflow(
        f"Unknown workflow {wanted}; defined workflows: {', '.join(w.name for w in workflows) or 'none'}",
        allowed=[w.name for w in workflows],
    )


def _workflow_schedule_rows(service: EvQueue, peer: Peer) -> list[tuple[etree._Element, dict[str, str]]]:
    """`workflow_schedules list`'s rows, each with the launch parameters of its schedule."""
    workflows = _workflows(service.api, peer)
    workflow_ids = {workflow.name: number for number, workflow in enumerate(workflows, start=1)}
    groups = {workflow.name: workflow.group for workflow in workflows}
    rows = []
    for number, schedule in enumerate(_workflow_schedules(service.api), start=1):
        target = schedule["target"]
        row = xml.element(
            "workflow_schedule",
            {
                "id": number,
                "node": "any",
                "workflow_id": workflow_ids.get(target["name"], ""),
                # evQueue's clients parse its sec;min;hour;day;month;wday; a calendar it cannot say goes as written.
                "schedule": Calendar.parse(schedule["calendar"]).evqueue_text() or schedule["calendar"],
                "onfailure": str(schedule["on_failure"]).upper(),
                "user": "",
                "host": "",
                "active": 1 if schedule["enabled"] and not schedule["suspended"] else 0,
                "comment": schedule["name"],  # jobd's schedules are named; evQueue's only have a comment
                "workflow_name": target["name"],
                "workflow_group": groups.get(target["name"], ""),
            },
        )
        rows.append((row, target["parameters"]))
    return rows


def _parameters(parameters: dict[str, str]) -> list[etree._Element]:
    return [xml.element("parameter", {"name": name, "value": value}) for name, value in parameters.items()]


def workflow_schedules_list(service: EvQueue, peer: Peer, command: xml.WorkflowSchedulesList) -> Result:
    rows = []
    for row, parameters in _workflow_schedule_rows(service, peer):
        if command.display_parameters:
            row.extend(_parameters(parameters))
        rows.append(row)
    return service.ok(children=rows)


# What evQueue's `workflow_schedule get` answers of a `workflow_schedules list` row (evQueue's WorkflowSchedule::Get):
# neither the id asked for nor the workflow's name and group, and the parameters always.
_WORKFLOW_SCHEDULE_GET: Final = ("workflow_id", "schedule", "onfailure", "user", "host", "active", "comment", "node")


def workflow_schedule_get(service: EvQueue, peer: Peer, command: xml.WorkflowScheduleGet) -> Result:
    rows = _workflow_schedule_rows(service, peer)
    listed = _numbered([row for row, _ in rows], command.schedule_id, "workflow schedule", "workflow_schedules list")
    schedule = xml.element("workflow_schedule", {name: listed.get(name) for name in _WORKFLOW_SCHEDULE_GET})
    schedule.extend(_parameters(rows[command.schedule_id - 1][1]))
    return service.ok(children=[schedule])


def _retry_schedule_rows(service: EvQueue) -> list[etree._Element]:
    """The `[retry_schedule.NAME]` sections as evQueue's retry schedules, ids numbering them by name from 1 (they are
    config sections, not database rows, as workflows and queues)."""
    schedules = service.api.engine.config.retry_schedules
    rows = []
    for number, name in enumerate(sorted(schedules), start=1):
        row = xml.element("schedule", {"id": number, "name": name})
        row.extend(retry_levels(schedules[name]))
        rows.append(row)
    return rows


def retry_schedules_list(service: EvQueue, peer: Peer, command: xml.RetrySchedulesList) -> Result:
    return service.ok(children=_retry_schedule_rows(service))


def retry_schedule_get(service: EvQueue, peer: Peer, command: xml.RetryScheduleGet) -> Result:
    """evQueue's `<schedule id name><level …/>…</schedule>`, as `retry_schedules list` shows it."""
    rows = _retry_schedule_rows(service)
    return service.ok(children=[_numbered(rows, command.schedule_id, "retry schedule", "retry_schedules list")])


# evQueue's processmanager.logs.tailsize default: what `processmanager tail` answers of a stream, at most.
TAIL_BYTES: Final = 20 * 1024


def processmanager_tail(service: EvQueue, peer: Peer, command: xml.ProcessManagerTail) -> Result:
    """The last TAIL_BYTES of the stream of the job `tid` names (a task's tid is its job's id), of its latest
    attempt, as text; evQueue read the files of a running task, jobd keeps a job's files once it has ended too.
    A job that has not started has no output yet: empty, as evQueue's files were before the task wrote."""
    engine = service.api.engine
    attempts = engine.get(command.tid).attempts  # UNKNOWN_JOB for an id that names no job
    if attempts == 0:
        return service.ok(text="")
    _, size = engine.read_attempt_output(command.tid, attempts, command.stream, 0, 0)
    start = max(0, size - TAIL_BYTES)
    data, _ = engine.read_attempt_output(command.tid, attempts, command.stream, start, TAIL_BYTES)
    return service.ok(text=data.decode("utf-8", "replace"))


def control_reload(service: EvQueue, peer: Peer, command: xml.ControlReload) -> Result:
    service.api.daemon.reload()  # every module: the configuration and workflows are one all-or-nothing set
    return service.ok()


Handler = Callable[[EvQueue, Peer, Any], Result]

HANDLERS: Final[Mapping[type, Handler]] = {
    xml.Ping: ping,
    xml.Quit: quit_,
    xml.InstanceLaunch: instance_launch,
    xml.InstanceQuery: instance_query,
    xml.InstanceWait: instance_wait,
    xml.InstanceCancel: instance_cancel,
    xml.InstanceKillTask: instance_killtask,
    xml.InstanceDelete: instance_delete,
    xml.InstanceDebugResume: instance_debugresume,
    xml.InstancesList: instances_list,
    xml.StatusWorkflows: status_workflows,
    xml.StatusScheduler: status_scheduler,
    xml.StatusConfiguration: status_configuration,
    xml.StatisticsGlobal: statistics_global,
    xml.StatisticsQueues: statistics_queues,
    xml.QueuePoolList: queuepool_list,
    xml.QueueGet: queue_get,
    xml.WorkflowsList: workflows_list,
    xml.WorkflowGet: workflow_get,
    xml.WorkflowSchedulesList: workflow_schedules_list,
    xml.WorkflowScheduleGet: workflow_schedule_get,
    xml.RetrySchedulesList: retry_schedules_list,
    xml.RetryScheduleGet: retry_schedule_get,
    xml.ProcessManagerTail: processmanager_tail,
    xml.ControlReload: control_reload,
}
