"""``lcmla demo`` without a browser: the page's handlers, saving and reusing an identity, and the ``--server`` client.

The client is tested over real HTTP against a small stdlib server written here to the ``lcmla serve`` contract
(``POST /v1/identities`` multipart ``photos`` -> ``{id, faces}``; ``POST /v1/generate`` JSON in generate's names ->
base64 images with their seeds; errors ``{"error", "field"}``); ``lcmla serve`` itself runs on Ray and is not
started here.
"""

import base64
import io
import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("gradio", reason="the web app needs gradio (the demo extra)")

from lcmla_sdk.cli import app as cli  # noqa: E402
from lcmla_sdk.demo.app import App  # noqa: E402
from lcmla_sdk.demo.backends import LocalBackend, RemoteBackend, Settings, ServiceError  # noqa: E402

SAMPLE_FACE = Path(__file__).parents[1] / "lcmla_sdk" / "assets" / "sample_face.jpg"
SETTINGS = Settings(["A photo of a face", "An oil painting"], None, "fast", 2, 5, 1, 64, 64)


def contract_server(model):
    """A threaded HTTP server on 127.0.0.1 answering the two calls of ``lcmla serve`` that the client makes."""
    identities = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def event(self, name, data):
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        def do_GET(self):
            id_ = self.path.rsplit("/", 1)[-1]
            if id_ not in identities:
                return self.reply(404, {"error": f"identity: no identity {id_}", "field": "identity"})
            self.reply(200, {"id": id_, "faces": [{"box": b} for b in identities[id_].boxes]})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            try:
                if self.path == "/v1/identities":
                    head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                    parts = BytesParser(policy=HTTP).parsebytes(head + raw).iter_parts()
                    photos = [p.get_content() for p in parts if p.get_param("name", header="content-disposition") == "photos"]
                    identity = model.encode_face(photos)
                    identities[identity.digest()] = identity
                    return self.reply(201, {"id": identity.digest(), "faces": [{"box": b} for b in identity.boxes]})
                body = json.loads(raw)
                if body["identity"] not in identities:
                    return self.reply(404, {"error": f"identity: no identity {body['identity']}", "field": "identity"})
                identity = identities[body.pop("identity")]
                streamed = self.headers.get("Accept") == "text/event-stream"
                if streamed:  # progress as server-sent events: headers now, an event after every step, the answer
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                steps = body.get("steps")
                images = model.generate(identity, **body, callback=lambda i, *_: streamed and self.event("progress", {"done": i + 1, "steps": steps}))
                seeds = [body["seed"] + i for i in range(len(images))]
                encoded = []
                for image in images:
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    encoded.append(base64.b64encode(buffer.getvalue()).decode())
                answer = {"images": [{"seed": s, "format": "png", "data": d} for s, d in zip(seeds, encoded)]}
                self.event("result", answer) if streamed else self.reply(200, answer)
            except ValueError as error:
                self.reply(422 if "face" in str(error) else 400, {"error": str(error), "field": str(error).split(":")[0]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(tiny):
    server = contract_server(tiny)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def local(tiny):
    return App(LocalBackend(tiny, "tiny"))


def test_photos_give_an_identity_with_its_box_that_can_be_saved_and_reused(local):
    person, boxed, saved, status = local.photos([str(SAMPLE_FACE)])
    assert "1 face(s) found" in status and len(person.boxes) == 1 and len(boxed) == 1
    assert np.asarray(boxed[0])[..., 1].max() == 255  # the green box is drawn
    reused, _, _, status = local.identity(saved)
    assert "loaded" in status and reused.ref.digest() == person.ref.digest()
    args = (SETTINGS.prompts[0], "", "fast", 2, 3, 2, 64, 96)
    first, files, status = local.generate(person, *args, progress=lambda *a, **k: None)
    again, _, _ = local.generate(reused, *args, progress=lambda *a, **k: None)
    assert status == "2 image(s) of 96x64." and [caption for _, caption in first] == ["seed 3", "seed 4"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(first, again))
    assert [Image.open(f).size for f in files] == [(96, 64), (96, 64)]


def test_a_webcam_snapshot_gives_an_identity(local):
    person, boxed, saved, status = local.webcam(np.asarray(Image.open(SAMPLE_FACE).convert("RGB")))
    assert "1 face(s) found" in status and len(person.boxes) == 1 and saved.endswith(".safetensors")
    assert local.webcam(None)[-1] == "Take a snapshot."


def test_the_page_reports_errors_in_its_status_line(local, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert local.photos([str(tmp_path / "notes.txt")])[-1] == (
        "**Error:** photos: notes.txt is not an image this app can read (JPEG, PNG, WebP, ...)"
    )
    assert local.identity(str(tmp_path / "notes.txt"))[-1].startswith("**Error:** ")
    person, *_ = local.photos([str(SAMPLE_FACE)])
    quiet = {"progress": lambda *a, **k: None}
    assert local.generate(None, "a", "", "fast", 2, 0, 1, 64, 64, **quiet)[-1].startswith("**Error:** face:")
    assert local.generate(person, " \n", "", "fast", 2, 0, 1, 64, 64, **quiet)[-1].startswith("**Error:** prompt:")
    assert local.generate(person, "a", "", "fast", 2, 0, 1, 65, 64, **quiet)[-1].startswith("**Error:** height:")
    assert local.generate(person, "a", "", "fast", 2, 0, 17, 64, 64, **quiet)[-1].startswith("**Error:** num_images:")


def test_the_remote_client_over_http_gives_the_local_images(server, tiny):
    remote, local = RemoteBackend(server), LocalBackend(tiny)
    photo = SAMPLE_FACE.read_bytes()
    person = remote.encode([photo])
    assert person.boxes == tiny.encode_face(photo).boxes
    steps = []
    made = remote.generate(person, SETTINGS, lambda done, total: steps.append((done, total)))
    expected = local.generate(local.encode([photo]), SETTINGS, lambda done, total: None)
    assert [seed for _, seed in made] == [5, 6] and steps == [(done, SETTINGS.steps) for done in range(1, SETTINGS.steps + 1)]
    for (got, _), (want, _) in zip(made, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ServiceError, match="no face found"):
        remote.encode([_png(np.full((64, 64, 3), 128, np.uint8))])
    with pytest.raises(ServiceError, match="^identity: no identity nope"):
        remote.generate(type(person)("nope"), SETTINGS, lambda *a: None)


def test_the_remote_client_reports_a_service_that_does_not_answer():
    with pytest.raises(ServiceError, match="^server: the lcmla service at http://127.0.0.1:9 did not answer"):
        RemoteBackend("http://127.0.0.1:9", timeout_s=2).encode([b"x"])


def test_the_demo_command_checks_its_options_before_loading_anything():
    result = CliRunner().invoke(cli, ["demo", "--server", "ftp://example"])
    assert result.exit_code == 2 and "server: expected an http:// or https:// URL" in result.output
    result = CliRunner().invoke(cli, ["demo", "--port", "70000"])
    assert result.exit_code == 2 and "port:" in result.output


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
