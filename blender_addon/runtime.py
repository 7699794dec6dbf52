"""The add-on's live state and `pump()`, the one place where backend updates touch bpy.

`pump()` runs on Blender's main thread only: from a timer in the UI, from
`bpy.ops.dreamloom.sync` in background Blender and the bpy module (where timers never fire). It
reads what the socket has (never waits), applies job events to the scene in seq order, and
records errors for the panel and for reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import bpy

from . import importer, preferences
from .core import _protocol
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
"""The image datablock the panel shows the newest preview in."""


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
class _State:
    """Module state: one session, one local backend, errors not yet reported."""

    session: ClientSession | None = None
    """The open connection, or None."""
    local: LocalBackend | None = None
    """The backend process this Blender started, or None."""
    reattach_needed: bool = True
    """Set at register and on file load: the next pump follows the scene's unfinished jobs."""
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
        timeout_s = prefs.request_timeout
        if prefs.backend_mode == "LOCAL" and prefs.backend_project_dir:
            local = start_local_backend()
            starting_for_s = time.monotonic() - local.started_at
            timeout_s = max(timeout_s, LOCAL_START_TIMEOUT_S - starting_for_s)
        STATE.session = ClientSession(prefs.connection())
        STATE.session.hello(timeout_s=timeout_s)
    return STATE.session


def close_session() -> None:
    """Close the socket; the next action opens a new one (and re-attaches the scene's jobs)."""
    if STATE.session is not None:
        STATE.session.close()
        STATE.session = None
    STATE.reattach_needed = True


def busy() -> bool:
    """True while a request waits for its reply or a followed job runs."""
    return STATE.session is not None and STATE.session.busy


def welcome_lines() -> list[str]:
    """Device and models from the newest `welcome`, for the preferences."""
    welcome = STATE.session.welcome if STATE.session else None
    if not welcome:
        return []
    models = ", ".join(f"{role}: {name}" for role, name in sorted((welcome.get("models") or {}).items()))
    return [f"Backend {welcome.get('server_version', '?')} on {welcome.get('device', '?')}", f"Models: {models or 'none'}"]


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
        if STATE.reattach_needed:
            reattach()
        if STATE.session is None:
            return 0
        check_local_backend()
        if STATE.session is None:
            return 0
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
    if updates:
        _redraw()
    return len(updates)


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
    unfinished = [(scene, item) for scene in bpy.data.scenes for item in scene.dreamloom.jobs
                  if item.state not in ("done", "failed", "cancelled")]
    if not unfinished:
        return
    client = session()
    client.list_jobs()
    for _scene, item in unfinished:
        client.follow(item.job_id, item.last_seq, item.kind, item.prompt)


def record_problem(problem: Problem) -> None:
    """Show the problem in every scene's panel and keep it for the next report."""
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
    """Apply one update from the session to the scene."""
    if isinstance(update, JobEvent):
        apply_event(update)
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


def apply_event(update: JobEvent) -> None:
    """Apply one job event (in seq order) and record its seq on the job and its object."""
    scene, item = find_job(update.job.job_id)
    if item is None:
        return  # a job deleted from the scene while events were on their way
    body = update.message.body
    kind = body.get("event")
    if kind == "mesh":
        if item.kind == "refine_texture":
            obj = bpy.data.objects.get(item.object_name)
            if obj is None:
                raise ValueError(f"refine target object {item.object_name!r} is gone")
            if body.get("final"):
                importer.apply_refine_result(obj, item, update.message)
        else:
            obj = importer.apply_generate_mesh(scene, item, update.message)
        item.stage = str(body.get("stage") or item.stage)
    elif kind in ("state", "stage"):
        item.state, item.stage = update.job.state, update.job.stage
        item.step, item.steps = update.job.step, update.job.steps
        item.error = update.job.error
        if item.state == "failed":
            record_problem(Problem(f"job '{item.prompt[:40]}' failed: {item.error}"))
        elif item.state in ("done", "cancelled"):
            STATE.notes.append(f"job '{item.prompt[:40]}' {item.state}")
    item.last_seq = update.seq
    obj = bpy.data.objects.get(item.object_name) if item.object_name else None
    if obj is not None and obj.get("dreamloom_job_id") == item.job_id:
        obj["dreamloom_seq"] = update.seq


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
        add_job_item(scene, str(body["job_id"]), ctx["kind"], ctx.get("prompt", ""), ctx.get("object_name", ""))
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


def apply_failure(update: RequestFailed) -> None:
    """An error reply or a timeout: shown in the panel and reported."""
    record_problem(Problem(f"{update.request_type}: {update.message}", update.field or ""))
    if update.code == "timeout" and update.request_type == "hello":
        close_session()  # the next action reconnects
        STATE.reattach_needed = False  # do not retry in a loop; the next action will
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
