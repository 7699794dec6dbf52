"""Draw the sidebar panel's layout as a picture (docs/images/panel.png), without a screen.

The bpy module has no UI to screenshot, so this runs the panels' own `draw()` methods against a
recording layout (same calls as `bpy.types.UILayout`: row, column, box, prop, operator, label,
progress...) with the add-on registered from the source tree and sample values in the scene, and
renders what was recorded with Pillow in Blender's dark theme colours. It shows which widgets
the panel has and in what order; it is a diagram, not a screenshot.

    .venv/bin/python blender_addon/tools/panel_diagram.py docs/images/panel.png
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

WIDTH = 440
ROW_H = 26
PAD = 8
BG, PANEL, WIDGET, TEXT, DIM, ACCENT, ALERT = "#303030", "#3d3d3d", "#545454", "#e6e6e6", "#a0a0a0", "#4772b3", "#b33c3c"


@dataclass
class Item:
    """One widget the panel drew."""

    kind: str
    """prop, operator, label, progress, image, header."""
    text: str
    """What it shows."""
    alert: bool = False
    """Drawn in the alert colour."""


@dataclass
class Recorder:
    """Stands in for UILayout: collects rows of items."""

    rows: list[list[Item]]
    current: list[Item] | None = None
    alert: bool = False

    def _add(self, item: Item) -> None:
        item.alert = item.alert or self.alert
        if self.current is not None:
            self.current.append(item)
        else:
            self.rows.append([item])

    def row(self, align: bool = False) -> "Recorder":
        self.rows.append([])
        return Recorder(self.rows, self.rows[-1], self.alert)

    def column(self, align: bool = False) -> "Recorder":
        return Recorder(self.rows, None, self.alert)

    def grid_flow(self, columns: int = 0, align: bool = False) -> "Recorder":
        return Recorder(self.rows, None, self.alert)

    def box(self) -> "Recorder":
        return Recorder(self.rows, None, self.alert)

    def prop(self, data, name: str, text: str | None = None, **_kw) -> None:
        rna = data.bl_rna.properties[name]
        value = getattr(data, name)
        label = rna.name if text is None else text
        if rna.type == "ENUM":
            shown = next((i.name for i in rna.enum_items if i.identifier == value), str(value))
        elif rna.type == "FLOAT" and getattr(rna, "array_length", 0):
            shown = "  ".join(f"{v:g}" for v in value)
        elif rna.type == "BOOLEAN":
            shown = ("v " if value else "> ") + label
            label = ""
        elif rna.type == "POINTER":
            shown = value.name if value else "(none)"
        elif rna.type == "FLOAT":
            shown = f"{value:g}"
        else:
            shown = str(value) if value not in ("", None) else _kw.get("placeholder", "")
        self._add(Item("prop", f"{label}: {shown}" if label else shown))

    def operator(self, idname: str, text: str | None = None, **_kw):
        import bpy

        module, name = idname.split(".")
        op = getattr(getattr(bpy.ops, module), name)
        icon = _kw.get("icon", "")
        self._add(Item("operator", op.get_rna_type().name if text is None else (text or f"[{icon.lower()[:7]}]")))
        return type("Props", (), {})()

    def label(self, text: str = "", **_kw) -> None:
        self._add(Item("label", text))

    def progress(self, factor: float = 0.0, type: str = "BAR", text: str = "") -> None:
        self._add(Item("progress", f"{factor:.3f}|{text}"))

    def template_ID(self, data, name: str, **_kw) -> None:
        self.prop(data, name)

    def template_icon(self, **_kw) -> None:
        self._add(Item("image", "latest preview render"))


def sample_scene():
    import bpy

    import blender_addon

    blender_addon.register()
    settings = bpy.context.scene.dreamloom
    settings.prompt = "a black and white cow, standing"
    settings.negative_prompt = "blurry, low quality"
    settings.image_path = "/home/artist/cow_front.png"
    settings.show_camera = True
    settings.steps = ""
    job = settings.jobs.add()
    job.job_id, job.prompt, job.state = "9c00e46c" * 4, settings.prompt, "running"
    job.stage, job.step, job.steps, job.eta_s = "geometry", 1240, 5000, 754.0
    for state, prompt in (("running", settings.prompt), ("done", "a teapot"), ("queued", "a wooden chair")):
        row = settings.server_jobs.add()
        row.job_id, row.state, row.prompt, row.kind = "0" * 32, state, prompt, "generate"
        row.stage, row.step, row.steps = ("geometry", 1240, 5000) if state == "running" else ("", 0, 0)
    settings.last_error = "submit: params.camera.elevation_deg: min 50 is above max 10"
    settings.last_error_field = "params.camera.elevation_deg"
    return bpy.context


def record(context) -> list[list[Item]]:
    from blender_addon import panels

    rows: list[list[Item]] = []
    for panel_cls in panels.CLASSES:
        rows.append([Item("header", panel_cls.bl_label)])
        holder = type("PanelSelf", (), {})()
        holder.layout = Recorder(rows)
        holder.draw_progress = lambda layout, settings: panels.DREAMLOOM_PT_main.draw_progress(holder, layout, settings)
        panel_cls.draw(holder, context)
    return [row for row in rows if row]


def render(rows: list[list[Item]], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 12)
    except OSError:
        font = ImageFont.load_default()
    height = PAD * 2 + ROW_H * sum(3 if r[0].kind == "image" else 1 for r in rows) + 28
    image = Image.new("RGB", (WIDTH + 2 * PAD, height), BG)
    draw = ImageDraw.Draw(image)
    draw.text((PAD, 6), "Sidebar tab Dreamloom: layout drawn from the panels' draw() code", fill=DIM, font=font)
    y = 28
    for row in rows:
        h = ROW_H * (3 if row[0].kind == "image" else 1)
        icons = [item.kind == "operator" and item.text.startswith("[") for item in row]
        wide = (WIDTH - 60 * sum(icons)) // max(1, len(row) - sum(icons))
        x = PAD
        for item, is_icon in zip(row, icons):
            x0, x1 = x, x + (60 if is_icon else wide) - 3
            x = x1 + 3
            box = (x0, y + 2, x1, y + h - 3)
            if item.kind == "header":
                draw.rectangle((PAD, y + 2, PAD + WIDTH, y + h - 3), fill=PANEL)
                draw.text((x0 + 6, y + 6), "v  " + item.text, fill=TEXT, font=font)
            elif item.kind == "operator":
                draw.rounded_rectangle(box, 4, fill=ACCENT if item.text in ("Generate",) else WIDGET)
                draw.text(((x0 + x1) // 2, y + h // 2), item.text, fill=TEXT, font=font, anchor="mm")
            elif item.kind == "prop":
                draw.rounded_rectangle(box, 4, fill="#282828", outline=WIDGET)
                draw.text((x0 + 6, y + 6), item.text[:56], fill=TEXT, font=font)
            elif item.kind == "progress":
                factor, text = item.text.split("|", 1)
                draw.rounded_rectangle(box, 4, fill="#282828")
                draw.rounded_rectangle((x0, y + 2, x0 + int((x1 - x0) * float(factor)), y + h - 3), 4, fill=ACCENT)
                draw.text((x0 + 6, y + 6), text, fill=TEXT, font=font)
            elif item.kind == "image":
                draw.rectangle((x0 + 100, y + 2, x0 + 100 + h - 5, y + h - 3), fill="#1e1e1e", outline=WIDGET)
                draw.text((x0 + 100 + h // 2, y + h // 2), "preview", fill=DIM, font=font, anchor="mm")
            else:
                draw.text((x0 + 6, y + 6), item.text[:70], fill=ALERT if item.alert else TEXT, font=font)
        y += h
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else REPO / "docs" / "images" / "panel.png"
    rows = record(sample_scene())
    render(rows, out)
    print(f"panel_diagram: {len(rows)} rows drawn to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
