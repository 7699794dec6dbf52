"""The add-on's live state and `pump()`, the one place where backend updates touch bpy.

`pump()` runs on Blender's main thread only: from a timer in the UI, from
`bpy.ops.dreamloom.sync` in background Blender and the bpy module (where timers never fire). It
reads what the socket has (never waits), queues job events, and applies each job's events in seq
order once their meshes are prepared (on a worker thread) and the scene can take them; `seq`
advances only over events applied. A backend that stops answering makes the jobs say "backend
unreachable, retrying" while the session reconnects with backoff and catches up by itself.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import bpy

from . import importer, preferences
from .core import _protocol
from .core import mesh as core_mesh
from .core.jobs import ApplyQueue, PendingEvent
from .core.local_backend import LocalBackend
from .core.session import (
    ClientSession,
    JobEvent,
    JobProgress,
    RequestDone,
    RequestFailed,
    SessionError,
    Update,
)

TIMER_BUSY_S = 0.1
"""Timer interval while requests or jobs are under way."""
TIMER_IDLE_S = 1.0
"""Timer interval otherwise."""
LOCAL_START_TIMEOUT_S = 180.0
"""How long `hello` may wait for a local backend that was just started (it loads its models)."""
PREVIEW_IMAGE_NAME = "Dreamloom Preview"
"""The image datablock the panel shows the newest preview in; each job's is this name plus its id."""
RETRY_FIRST_S = 1.0
"""Seconds before the first reconnect attempt once the backend stopped answering."""
RETRY_MAX_S = 15.0
"""The longest wait between reconnect attempts (the wait doubles each time up to this)."""
RETRY_HELLO_TIMEOUT_S = 3.0
"""How long a reconnect attempt's `hello` waits."""
UNREACHABLE_NOTE = "backend unreachable, retrying"
"""What a job's row says while the backend does not answer."""
FINISHED_STATES = ("done", "failed", "cancelled")


@dataclass
class Problem:
    """An error to show in the panel and report."""

    message: str
    """One sentence a person can act on (the server's message where it came from the server)."""
    field: str = ""
    """The field at fault, when there is one."""

    def text(self) -> str:
        """The message, with the field when it is not already named."""
        if self.field and self.field not in self.message:
            return f"{self.message} (field {self.field})"
        return self.message


@dataclass
class Outgoing:
    """A submit waiting for its buffers from the worker thread."""

    kind: str
    """The job kind."""
    params: dict
    """The checked params."""
    buffers: Future
    """The worker's buffers dict (or its error)."""
    context: dict
    """The submit's context (scene, object name)."""


@dataclass
class _State:
    """Module state: one session, one local backend, waiting events, errors not yet reported."""

    session: ClientSession | None = None
    """The open connection, or None."""
    local: LocalBackend | None = None
    """The backend process this Blender started, or None."""
    reattach_needed: bool = True
    """Set at register and on file load: the next pump follows the scene's unfinished jobs."""
    queue: ApplyQueue = field(default_factory=ApplyQueue)
    """Events received and not yet applied, per job."""
    outgoing: list[Outgoing] = field(default_factory=list)
    """Submits whose buffers the worker is still building."""
    retry_at: float | None = None
    """time.monotonic() of the next reconnect attempt while the backend is unreachable, else None."""
    retry_delay_s: float = RETRY_FIRST_S
    """The wait before the attempt after next."""
    problems: list[Problem] = field(default_factory=list)
    """Errors not yet reported by an operator."""
    notes: list[str] = field(default_factory=list)
    """Informational lines not yet reported."""


STATE = _State()


# 1. Session -----------------------------------------------------------------------------------------


def session() -> ClientSession:
    """The open session, opened (and `hello` sent) when there is none. Raises SessionError."""
    if STATE.session is None:
        prefs = preferences.get()
        timeout_s = RETRY_HELLO_TIMEOUT_S if STATE.retry_at is not None else prefs.request_timeout
        if prefs.backend_mode == "LOCAL":
            if not prefs.backend_project_dir.strip():
                raise SessionError(
                    "backend_project_dir",
                    "Local mode starts the backend from the Dreamloom project folder, and Project Folder "
                    "is empty: set it in the add-on's preferences, or choose Remote",
                )
            local = start_local_backend()
            starting_for_s = time.monotonic() - local.started_at
            timeout_s = max(timeout_s, LOCAL_START_TIMEOUT_S - starting_for_s)
        STATE.session = ClientSession(prefs.connection())
        STATE.session.hello(timeout_s=timeout_s)
    return STATE.session


def close_session() -> None:
    """Close the socket and forget waiting events; the next action opens a new session and
    re-attaches the scene's jobs from their last applied seq (the server sends the rest again)."""
    if STATE.session is not None:
        STATE.session.close()
        STATE.session = None
    STATE.queue.clear()
    STATE.reattach_needed = True


def busy() -> bool:
    """True while a request waits, a followed job runs, an update waits or a reconnect is due."""
    return ((STATE.session is not None and STATE.session.busy) or bool(STATE.queue) or bool(STATE.outgoing)
            or STATE.retry_at is not None)


def unfinished_items() -> list:
    """Every job row, in every scene, whose job has not ended."""
    return [item for scene in bpy.data.scenes for item in scene.dreamloom.jobs if item.state not in FINISHED_STATES]


def welcome_lines() -> list[str]:
    """Device and models from the newest `welcome`, for the preferences."""
    welcome = STATE.session.welcome if STATE.session else None
    if not welcome:
        return []
    models = ", ".join(f"{role}: {name}" for role, name in sorted((welcome.get("models") or {}).items()))
    return [f"Backend {welcome.get('server_version', '?')} on {welcome.get('device', '?')}", f"Models: {models or 'none'}"]


def schedule_reconnect(reason: str) -> None:
    """The backend stopped answering: close the session, say so on each job, retry later."""
    first = STATE.retry_at is None
    close_session()
    STATE.reattach_needed = False
    delay_s = RETRY_FIRST_S if first else STATE.retry_delay_s
    STATE.retry_at = time.monotonic() + delay_s
    STATE.retry_delay_s = min(2.0 * delay_s, RETRY_MAX_S)
    for item in unfinished_items():
        item.note = f"{UNREACHABLE_NOTE} (next try in {delay_s:.0f} s)"
    if first:
        record_problem(Problem(f"{reason}; retrying by itself", "backend_address"))


def reconnected() -> None:
    """The backend answered again: clear the jobs' notes."""
    if STATE.retry_at is None:
        return
    STATE.retry_at, STATE.retry_delay_s = None, RETRY_FIRST_S
    for item in unfinished_items():
        if item.note.startswith(UNREACHABLE_NOTE):
            item.note = ""
    STATE.notes.append("reconnected to the backend")


# 2. Local backend -----------------------------------------------------------------------------------


def start_local_backend() -> LocalBackend:
    """Start the backend process from the preferences (raises SessionError naming a preference)."""
    if STATE.local is not None and STATE.local.running:
        return STATE.local
    settings = preferences.get().local_backend()
    STATE.local = LocalBackend(settings, preferences.data_dir() / "backend.log")
    STATE.local.start()
    return STATE.local


def stop_local_backend() -> bool:
    """Stop the local backend (frees the GPU). Returns False when none was running."""
    if STATE.local is None:
        return False
    was_running = STATE.local.running
    close_session()
    STATE.local.stop()
    return was_running


def check_local_backend() -> None:
    """If the local backend died while a request waits on it, say so (with its log) at once."""
    local = STATE.local
    if local is None or local.running or STATE.session is None or not STATE.session.pending:
        return
    tail = " | ".join(local.log_tail(3))
    if "CUDA" in tail:
        record_problem(Problem(
            f"the local backend found no CUDA GPU on this computer ({tail}); to try the add-on without one, "
            "set Device to CPU with the Tiny models (`--device cpu`), or use a Remote backend on a GPU box",
            "backend_device",
        ))
    else:
        record_problem(Problem(f"the local backend exited with status {local.exit_code}: {tail}", "backend_python"))
    close_session()
    STATE.reattach_needed = False


def local_backend_status() -> str:
    """One line about the local backend process."""
    if STATE.local is None:
        return "Local backend: not started by this Blender"
    if STATE.local.running:
        return f"Local backend: running (pid {STATE.local.process.pid})"
    return f"Local backend: stopped (exit status {STATE.local.exit_code})"


def local_backend_log(lines: int) -> list[str]:
    """The last lines of the local backend's log."""
    return [] if STATE.local is None else STATE.local.log_tail(lines)


# 3. Pumping -----------------------------------------------------------------------------------------


def pump(max_messages: int = 64) -> int:
    """Apply what the backend sent since the last call; returns the number of updates handled."""
    try:
        if STATE.retry_at is not None and STATE.session is None and time.monotonic() >= STATE.retry_at:
            STATE.reattach_needed = True
        if STATE.reattach_needed:
            reattach()
        updates = []
        if STATE.session is not None:
            check_local_backend()
        if STATE.session is not None:
            updates = STATE.session.poll(max_messages)
    except SessionError as exc:
        record_problem(Problem(str(exc), exc.field))
        return 0
    except _protocol.ProtocolError as exc:  # the server sent frames that break the protocol
        record_problem(Problem(f"bad message from the backend: {exc.message}", exc.field or ""))
        return 0
    for update in updates:
        try:
            dispatch(update)
        except Exception as exc:  # one bad update must not stop the others
            record_problem(Problem(f"could not apply {type(update).__name__}: {exc}"))
    applied = apply_waiting() + send_prepared()
    if updates or applied:
        _redraw()
    return len(updates) + applied


def submit_prepared(kind: str, params: dict, make_buffers, context: dict) -> None:
    """Submit once `make_buffers()` has built the buffers on the worker thread (a pump sends it)."""
    session()  # a connection problem is reported now, by the operator
    STATE.outgoing.append(Outgoing(kind, params, STATE.queue.run(make_buffers), context))


def send_prepared() -> int:
    """Send the submits whose buffers are ready (checked by the protocol's rules first)."""
    sent = 0
    for outgoing in [o for o in STATE.outgoing if o.buffers.done()]:
        STATE.outgoing.remove(outgoing)
        try:
            buffers = outgoing.buffers.result()
            _protocol.params.validate_submit(outgoing.kind, outgoing.params, buffers)
            session().submit(outgoing.kind, outgoing.params, buffers, context=outgoing.context)
        except (core_mesh.MeshDataError, _protocol.ProtocolError, SessionError, ValueError, CancelledError) as exc:
            field_name = getattr(exc, "field", "") or ""
            record_problem(Problem(f"{outgoing.kind}: {getattr(exc, 'message', None) or exc}", field_name))
        sent += 1
    return sent


def timer() -> float:
    """The `bpy.app.timers` callback: pump, show new errors, come back soon while busy."""
    pump()
    windows = getattr(bpy.context.window_manager, "windows", [])
    if STATE.problems and len(windows):
        popup_problems(windows[0], take_problems())
    return TIMER_BUSY_S if busy() else TIMER_IDLE_S


def popup_problems(window, problems: list[Problem]) -> None:
    """Show errors that arrived in the background as a popup report (the panel shows them too)."""

    def draw(menu, _context) -> None:
        for problem in problems:
            menu.layout.label(text=problem.text()[:200], icon="ERROR")

    with bpy.context.temp_override(window=window):
        bpy.context.window_manager.popup_menu(draw, title="Dreamloom", icon="ERROR")


def reattach() -> None:
    """Follow again every unfinished job of every scene, from its last applied seq."""
    STATE.reattach_needed = False
    unfinished = unfinished_items()
    if not unfinished and STATE.retry_at is None:
        return
    client = session()
    client.list_jobs()
    for item in unfinished:
        client.follow(item.job_id, item.last_seq, item.kind, item.prompt)


def record_problem(problem: Problem) -> None:
    """Show the problem in every scene's panel and keep it for the next report (once while it
    is not reported yet)."""
    if any(p.text() == problem.text() for p in STATE.problems):
        return
    STATE.problems.append(problem)
    for scene in bpy.data.scenes:
        scene.dreamloom.last_error = problem.message
        scene.dreamloom.last_error_field = problem.field
    print(f"Dreamloom: {problem.text()}")


def take_problems() -> list[Problem]:
    """The problems since the last call (for an operator to report)."""
    problems, STATE.problems = STATE.problems, []
    return problems


def take_notes() -> list[str]:
    """Informational lines since the last call (job done, cancelled...)."""
    notes, STATE.notes = STATE.notes, []
    return notes


# 4. Applying updates --------------------------------------------------------------------------------


def dispatch(update: Update) -> None:
    """Take one update from the session: events are queued, the rest applied at once."""
    if isinstance(update, JobEvent):
        queue_event(update)
    elif isinstance(update, JobProgress):
        apply_progress(update)
    elif isinstance(update, RequestDone):
        apply_reply(update)
    elif isinstance(update, RequestFailed):
        apply_failure(update)


def find_job(job_id: str) -> tuple[bpy.types.Scene, object] | tuple[None, None]:
    """The scene and job item following `job_id`."""
    for scene in bpy.data.scenes:
        item = scene.dreamloom.job(job_id)
        if item is not None:
            return scene, item
    return None, None


def add_job_item(scene: bpy.types.Scene, job_id: str, kind: str, prompt: str, object_name: str = ""):
    """A new job row in the scene (the job is followed from seq 0)."""
    item = scene.dreamloom.jobs.add()
    item.job_id, item.kind, item.prompt, item.object_name = job_id, kind, prompt, object_name
    item.state, item.last_seq = "queued", 0
    scene.dreamloom.active_job_index = len(scene.dreamloom.jobs) - 1
    return item


def queue_event(update: JobEvent) -> None:
    """Queue a job event; a mesh the scene will take starts being prepared on the worker."""
    _scene, item = find_job(update.job.job_id)
    if item is None:
        return  # a job deleted from the scene while events were on their way
    body = update.message.body
    prepare = None
    if body.get("event") == "mesh":
        if item.kind == "refine_texture":
            prepare = core_mesh.prepare_refine_result if body.get("final") else None
        elif not item.detached:
            prepare = core_mesh.prepare_mesh_event
    STATE.queue.push(item.job_id, update.message, prepare)


def apply_waiting() -> int:
    """Apply each job's queued events in seq order while they are ready; returns how many.

    An update the scene cannot take now (`UpdateWaits`) stays first in its job's queue and says
    why on the job's row; a refused mesh (bad data) is skipped with one line, the object keeping
    its last good mesh. `last_seq` and `dreamloom_seq` advance over applied events only.
    """
    applied = 0
    for job_id in list(STATE.queue.jobs):
        while (pending := STATE.queue.head(job_id)) is not None:
            scene, item = find_job(job_id)
            if item is None:
                STATE.queue.drop(job_id)
                break
            try:
                apply_pending(scene, item, pending)
            except importer.UpdateWaits as exc:
                item.note = f"update {pending.seq} waits: {exc}"
                break
            except Exception as exc:  # bad mesh data (MeshDataError) or a fault: this event only
                item.note = f"event {pending.seq} refused: {exc}"
                record_problem(Problem(f"job '{item.prompt[:40]}': {item.note}"))
            STATE.queue.pop(job_id)
            mark_applied(item, pending.seq)
            applied += 1
    return applied


def apply_pending(scene: bpy.types.Scene, item, pending: PendingEvent) -> None:
    """Apply one queued event to the scene (a superseded mesh needs nothing)."""
    body = pending.message.body
    kind = body.get("event")
    if kind == "mesh" and not pending.superseded:
        apply_mesh(scene, item, pending)
    elif kind == "state":
        item.state = str(body.get("state") or item.state)
        item.position = int(body.get("position") or 0)
        if item.state == "failed":
            item.error = str(body.get("error") or "the job failed without a message")
            record_problem(Problem(f"job '{item.prompt[:40]}' failed: {item.error}"))
        elif item.state in ("done", "cancelled"):
            STATE.notes.append(f"job '{item.prompt[:40]}' {item.state}")
    elif kind == "stage":
        item.stage, item.steps, item.step = str(body.get("stage") or item.stage), int(body.get("steps") or 0), 0
    elif kind == "note":  # what the job decided for the artist (a clamped face budget, ...)
        STATE.notes.append(f"job '{item.prompt[:40]}': {body.get('text') or ''}")


def apply_mesh(scene: bpy.types.Scene, item, pending: PendingEvent) -> None:
    """A mesh event into the job's object (or the refined texture onto its target)."""
    body = pending.message.body
    if item.kind == "refine_texture":
        if body.get("final"):
            target = importer.find_object(item.job_id, item.object_name, importer.REFINE_JOB_ID_PROP)
            if target is None:
                raise ValueError(f"the object this job refines ({item.object_name!r}) is gone")
            importer.apply_refine_result(target, pending.prepared.result(), scene.dreamloom.refine_slots)
            item.object_name, item.note = target.name, ""
    elif not item.detached:
        if item.object_name and importer.find_object(item.job_id, item.object_name) is None:
            detach(item)  # the artist deleted the object
            return
        obj = importer.apply_generate_mesh(scene, item, pending.prepared.result())
        item.note = ""
        push_undo(f"Dreamloom: {obj.name} update {pending.seq}")
    item.stage = str(body.get("stage") or item.stage)


def push_undo(message: str) -> None:
    """Make the applied update one undo step, where Blender has a window (not in background)."""
    if not bpy.app.background and bpy.ops.ed.undo_push.poll():
        bpy.ops.ed.undo_push(message=message)


def detach(item) -> None:
    """The job's object was deleted: stop writing into the scene (nothing is recreated)."""
    item.detached = True
    importer.remove_orphan_meshes(item.job_id)
    item.note = "its object was deleted: the job runs on; Import Result brings the final mesh back"


def mark_applied(item, seq: int) -> None:
    """Record that the job's events up to `seq` are in the scene."""
    item.last_seq = seq
    if item.kind != "refine_texture":
        obj = importer.find_object(item.job_id, item.object_name)
        if obj is not None:
            obj["dreamloom_seq"] = seq


def apply_progress(update: JobProgress) -> None:
    """Stage, step, time left and the preview image of a running job."""
    _scene, item = find_job(update.job.job_id)
    if item is None:
        return
    item.stage, item.step, item.steps = update.job.stage, update.job.step, update.job.steps
    item.eta_s = -1.0 if update.job.eta_s is None else update.job.eta_s
    if update.job.preview_png is not None:
        show_preview(update.job.preview_png)
        update.job.preview_png = None


def show_preview(png: bytes) -> None:
    """Put the PNG into the "Dreamloom Preview" image the panel shows."""
    old = bpy.data.images.get(PREVIEW_IMAGE_NAME)
    image = importer.packed_image(PREVIEW_IMAGE_NAME, png)
    if old is not None:
        old.user_remap(image)
        bpy.data.images.remove(old)
        image.name = PREVIEW_IMAGE_NAME
    image.use_fake_user = False


def apply_reply(update: RequestDone) -> None:
    """A successful reply: new jobs, the job list, deletions."""
    body, ctx = update.reply.body, update.context
    if update.request_type == "submit":
        scene = bpy.data.scenes.get(ctx.get("scene", "")) or bpy.context.scene
        item = add_job_item(scene, str(body["job_id"]), ctx["kind"], ctx.get("prompt", ""), ctx.get("object_name", ""))
        item.params_json = json.dumps(ctx.get("params") or {})
        item.place_at, item.target_size = ctx.get("place_at", (0.0, 0.0, 0.0)), float(ctx.get("target_size", 0.0))
        if ctx.get("object_name"):
            obj = bpy.data.objects.get(ctx["object_name"])
            if obj is not None and ctx["kind"] == "refine_texture":
                obj["dreamloom_refine_job_id"] = str(body["job_id"])
    elif update.request_type == "list_jobs":
        for scene in bpy.data.scenes:
            fill_server_jobs(scene, STATE.session.server_jobs if STATE.session else [])
    elif update.request_type == "delete_job":
        job_id = str(body.get("job_id"))
        for scene in bpy.data.scenes:
            jobs = scene.dreamloom.jobs
            for index in reversed(range(len(jobs))):
                if jobs[index].job_id == job_id:
                    jobs.remove(index)
            fill_server_jobs(scene, STATE.session.server_jobs if STATE.session else [])
    elif update.request_type == "hello":
        STATE.notes.append(" / ".join(welcome_lines()))
        reconnected()
    elif update.request_type == "get_result" and ctx.get("import"):
        scene = bpy.data.scenes.get(ctx.get("scene", "")) or bpy.context.scene
        job_id = str(body.get("job_id"))
        _scene, item = find_job(job_id)
        obj = importer.import_result(scene, job_id, item.prompt if item else job_id, bytes(update.reply.buffers["model"]))
        if item is not None:
            item.object_name, item.detached, item.note = obj.name, False, ""
        STATE.notes.append(f"imported the result of job {job_id[:8]} as {obj.name!r}")


def fill_server_jobs(scene: bpy.types.Scene, jobs: list[dict]) -> None:
    """Copy the backend's job list into the scene's panel list."""
    rows = scene.dreamloom.server_jobs
    rows.clear()
    for job in jobs:
        row = rows.add()
        row.job_id = str(job.get("job_id", ""))
        row.kind = str(job.get("kind", ""))
        row.state = str(job.get("state", ""))
        row.prompt = str(job.get("prompt") or "")
        row.stage = str(job.get("stage") or "")
        row.step = int(job.get("step") or 0)
        row.steps = int(job.get("steps") or 0)
        row.last_seq = int(job.get("last_seq") or 0)
        worker = job.get("worker")
        row.worker = str(worker.get("name") or "") if isinstance(worker, dict) else ""


def apply_failure(update: RequestFailed) -> None:
    """An error reply or a timeout: shown in the panel and reported. A backend that stops
    answering while jobs run is retried with backoff."""
    if update.code == "timeout" and (update.context.get("heartbeat") or update.request_type == "hello"):
        if unfinished_items():
            schedule_reconnect(f"{update.request_type}: {update.message}")
            return
        if update.request_type == "hello":
            close_session()  # the next action reconnects
            STATE.reattach_needed = False  # do not retry in a loop; the next action will
    record_problem(Problem(f"{update.request_type}: {update.message}", update.field or ""))
    if update.code == "unknown_job" and update.job_id:
        _scene, item = find_job(update.job_id)
        if item is not None:
            item.state, item.error = "failed", update.message


def _redraw() -> None:
    window_manager = bpy.context.window_manager
    for window in getattr(window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()
