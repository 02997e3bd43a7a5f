"""``lcmla demo``: a local web page (Gradio) to personalize faces: photos in, a gallery out.

The page keeps one identity at a time: photos (files or a webcam snapshot) are encoded as soon as they arrive and
shown with their detected face boxes; the identity can be downloaded and uploaded again later. Errors of the user's
making (no face, a file that is not an image, a value out of range) are shown in the page's status line with the
SDK's message, never as a traceback.
"""

from __future__ import annotations

import io
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..images import load_rgb
from ..request import MODES
from .backends import LocalBackend, Person, RemoteBackend, Settings, photo_bytes, saved_identity

# Gradio reads this when it is imported: no usage statistics leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402

log = logging.getLogger("lcmla")
STYLES = {
    "Photo": "A photo of a face",
    "Oil painting": "An oil painting of a face",
    "Watercolor": "A watercolor painting of a face",
    "Cubism": "A cubism painting of a face",
    "Pencil sketch": "A pencil sketch of a face",
    "Pop art": "A pop art portrait of a face",
    "Anime": "An anime drawing of a face",
    "Bronze statue": "A bronze statue of a face",
}
MAX_IMAGES = 16  # per click: the page is for looking, not for batch jobs (lcmla generate is)
Backend = LocalBackend | RemoteBackend


def error_text(error: BaseException) -> str:
    return f"**Error:** {error}"


class App:
    """The page's event handlers over a backend; each returns the values of the components it updates."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.folder = Path(tempfile.mkdtemp(prefix="lcmla-demo-"))

    def run(self, action, failed: tuple) -> tuple:
        """``action()``, or ``failed`` with the error in the status line (the user's mistakes with their message,
        anything else with a pointer to the server's log)."""
        try:
            return action()
        except (ValueError, OSError) as error:  # LcmlaError family, httpx and file errors
            return (*failed, error_text(error))
        except Exception as error:  # noqa: BLE001 - the page must never show a traceback
            log.exception("lcmla demo: unexpected error")
            return (*failed, error_text(f"unexpected {type(error).__name__} (details in the server's log)"))

    # ------------------------------------------------------------------ identity
    def photos(self, files: list[Any] | None) -> tuple:
        def action():
            if not files:
                return None, [], None, "Upload one or more photos of one person."
            photos = [photo_bytes(f, Path(f).name) for f in files]
            return self._show(self.backend.encode(photos), photos)

        return self.run(action, (None, [], None))

    def webcam(self, frame) -> tuple:
        def action():
            if frame is None:
                return None, [], None, "Take a snapshot."
            buffer = io.BytesIO()
            Image.fromarray(frame).convert("RGB").save(buffer, format="PNG")
            photos = [buffer.getvalue()]
            return self._show(self.backend.encode(photos), photos)

        return self.run(action, (None, [], None))

    def identity(self, file: Any) -> tuple:
        def action():
            if file is None:
                return None, [], None, ""
            person = self.backend.load(file)
            return person, [], None, f"Identity {person.label} loaded: generate."

        return self.run(action, (None, [], None))

    def _show(self, person: Person, photos: list[bytes]) -> tuple:
        boxed = [draw_box(load_rgb(data), box) for data, box in zip(photos, person.boxes or [None] * len(photos))]
        saved = saved_identity(self.backend, person, self.folder)
        found = sum(box is not None for box in person.boxes)
        note = f"{found} face(s) found" if found else "face detection is off for this model"
        return person, boxed, str(saved), f"Identity {person.label} from {len(photos)} photo(s), {note}: generate."

    # ------------------------------------------------------------------ generation
    def generate(self, person, prompts, negative, mode, steps, seed, num_images, height, width,
                 progress=gr.Progress()) -> tuple:  # fmt: skip
        def action():
            if person is None:
                raise ValueError("face: upload photos of a face (or a saved identity) first")
            lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
            if not lines:
                raise ValueError("prompt: write at least one prompt (one per line), or pick a style")
            count = len(lines) * (num_images if isinstance(num_images, int) else 1)
            if count > MAX_IMAGES:
                raise ValueError(f"num_images: {count} images (prompts x images) asked; this page makes {MAX_IMAGES} at most")
            negative_prompt = (negative or "").strip() or None
            seed_ = random.randrange(2**31) if seed is None else seed
            settings = Settings(lines, negative_prompt, mode, steps, seed_, num_images, height, width)
            progress(0, desc="starting")
            made = self.backend.generate(person, settings, lambda done, total: progress((done, total), desc="denoising"))
            files = []
            for index, (image, image_seed) in enumerate(made):
                path = self.folder / f"lcmla-{index:02d}-seed{image_seed}.png"
                image.save(path)
                files.append(str(path))
            gallery = [(image, f"seed {image_seed}") for image, image_seed in made]
            first = made[0][0]
            return gallery, files, f"{len(made)} image(s) of {first.width}x{first.height}."

        return self.run(action, ([], None))


def draw_box(image: Image.Image, box: list[float] | None) -> Image.Image:
    if box is None:
        return image
    image = image.copy()
    ImageDraw.Draw(image).rectangle(box, outline=(0, 255, 0), width=max(2, min(image.size) // 100))
    return image


def build(backend: Backend) -> gr.Blocks:
    """The page."""
    app = App(backend)
    size = backend.default_size
    with gr.Blocks(title="lcmla", analytics_enabled=False) as page:
        person = gr.State(None)
        gr.Markdown(f"## lcmla: LCM-Lookahead face personalization\nModel: {backend.where}", elem_id="model")
        with gr.Row():
            with gr.Column():
                photos = gr.File(label="Face photos (one person)", file_count="multiple", elem_id="photos")
                webcam = gr.Image(label="Or a webcam snapshot", sources=["webcam"], type="numpy", elem_id="webcam")
                saved = gr.File(label="Saved identity: download it to reuse later", elem_id="saved", interactive=False)
                reuse = gr.File(label="Reuse a saved identity", elem_id="reuse")
                faces = gr.Gallery(label="Detected faces", elem_id="faces", height=240, object_fit="contain",
                                   preview=False)  # fmt: skip
            with gr.Column():
                style = gr.Dropdown(list(STYLES), multiselect=True, label="Style presets", elem_id="style")
                prompts = gr.Textbox("A photo of a face", lines=3, label="Prompts (one per line)", elem_id="prompts")
                negative = gr.Textbox("", label="Negative prompt", elem_id="negative")
                with gr.Row():
                    mode = gr.Radio(["fast", "quality"], value="fast", label="Mode", elem_id="mode")
                    steps = gr.Number(MODES["fast"], precision=0, label="Steps", elem_id="steps")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed (empty: random)", elem_id="seed")
                    num_images = gr.Number(1, precision=0, label="Images per prompt", elem_id="num-images")
                with gr.Row():
                    height = gr.Number(size, precision=0, label="Height", elem_id="height")
                    width = gr.Number(size, precision=0, label="Width", elem_id="width")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown("Upload photos of a face to begin.", elem_id="status")
                gallery = gr.Gallery(label="Images", elem_id="gallery", format="png", columns=4, object_fit="contain",
                                     preview=False)  # fmt: skip
                downloads = gr.File(label="Download", file_count="multiple", elem_id="downloads", interactive=False)

        identity_outputs = [person, faces, saved, status]
        photos.upload(app.photos, photos, identity_outputs)
        webcam.change(app.webcam, webcam, identity_outputs)
        reuse.upload(app.identity, reuse, identity_outputs)
        mode.change(lambda chosen: MODES.get(chosen), mode, steps)  # each mode's default number of steps
        style.change(lambda chosen: "\n".join(STYLES[name] for name in chosen or []), style, prompts)
        go.click(app.generate, [person, prompts, negative, mode, steps, seed, num_images, height, width],
                 [gallery, downloads, status])  # fmt: skip
    return page


def launch(model: str, server: str | None, host: str, port: int, device: str | None, faces: str,
           open_browser: bool = False, block: bool = True) -> gr.Blocks:  # fmt: skip
    """Load the model (or connect to ``server``), build the page and serve it on ``host``:``port`` (no share link)."""
    if server is not None:
        backend: Backend = RemoteBackend(server)
    else:
        from ..pipeline import Personalizer

        backend = LocalBackend(Personalizer.from_pretrained(model, device=device, faces=faces), model)
    page = build(backend)
    page.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, inbrowser=open_browser, show_error=False,
        prevent_thread_lock=not block, quiet=not block,
    )  # fmt: skip
    return page
