"""Load test of a PersonSearch service: `locust -f loadtest/thi.py [--host ADDRESS]`.

Task mix (weights are command-line options): plain Search, Search with camera/time filters,
THI Search, streamed THI Search (when the service offers SearchStream) and a small share of
Enroll. Every gRPC call fires one Locust request event through a client interceptor; the
request name is the RPC and the query's mode, e.g. "Search [thi]" or "Enroll".

    locust -f loadtest/thi.py --headless -u 8 -r 4 -t 60s --csv out/run
    locust -f loadtest/thi.py --host 10.0.0.5:50051 --icl-token-file t.txt --icl-ca-file ca.pem
    locust -f loadtest/thi.py --headless -u 16 --icl-step-users 4 --icl-step-s 30 -t 150s

It talks to the service over gRPC only, through the API package (`icl_api`).
"""

from __future__ import annotations

import io
import itertools
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

# gRPC must be patched for gevent before any channel exists (Locust's users are greenlets).
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import grpc  # noqa: E402
from locust import LoadTestShape, User, events  # noqa: E402

from icl.orchestrator.settings import ClientSettings  # noqa: E402
from icl_api import pb, pb_grpc  # noqa: E402
from icl_api.client import (  # noqa: E402
    DEFAULT_ADDRESS,
    TlsOptions,
    delete_request,
    gallery_image,
    open_channel,
    search_request,
)

HERE = Path(__file__).resolve().parent
DEFAULT_QUERIES = HERE / "queries.txt"
# The demo gallery's cameras and day (icl demo): the filters' defaults.
DEMO_CAMERAS = "cam-01,cam-02,cam-03,cam-04,cam-05,cam-06"
DEMO_DAY_START_MS = 1_767_600_000_000
LOADTEST_CAMERA = "loadtest"  # where Enroll tasks put their crops; deleted at the end


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser  # Locust lists custom options under their own heading
    group.add_argument("--icl-queries", default=str(DEFAULT_QUERIES), help="one query per line")
    group.add_argument("--icl-top-k", type=int, default=10)
    group.add_argument("--icl-timeout-s", type=float, default=30.0, help="deadline per call")
    group.add_argument("--icl-cameras", default=DEMO_CAMERAS, help="cameras for filtered search")
    group.add_argument(
        "--icl-day-start-ms", type=int, default=DEMO_DAY_START_MS, help="start of time filters"
    )
    group.add_argument("--icl-thi-candidates", type=int, default=5, help="THI's K")
    group.add_argument("--icl-thi-xi", type=float, default=None, help="THI's xi (service default)")
    for task, weight in (("plain", 6), ("filtered", 2), ("thi", 2), ("stream", 1), ("enroll", 1)):
        group.add_argument(f"--icl-{task}-weight", type=int, default=weight)
    group.add_argument("--icl-enroll-batch", type=int, default=4, help="crops per Enroll")
    group.add_argument(
        "--icl-keep-enrolled",
        action="store_true",
        help=f"keep the crops Enroll tasks stored (camera {LOADTEST_CAMERA!r}); default deletes",
    )
    group.add_argument("--icl-token", default="", is_secret=True, help="or ICL_TOKEN")
    group.add_argument("--icl-token-file", default="", help="file holding the bearer token")
    group.add_argument("--icl-ca-file", default="", help="CA bundle: turns TLS on")
    group.add_argument("--icl-cert-file", default="", help="client certificate (mutual TLS)")
    group.add_argument("--icl-key-file", default="", help="client key (mutual TLS)")
    group.add_argument("--icl-server-name", default="", help="TLS name to expect")
    group.add_argument(
        "--icl-step-users", type=int, default=0, help="stepped ramp: users added per step"
    )
    group.add_argument("--icl-step-s", type=float, default=30.0, help="stepped ramp: step length")


def _mode(request: Any) -> str:
    if isinstance(request, pb.SearchRequest):
        if request.thi.enabled:
            return "thi"
        if request.camera_ids or request.HasField("time_range"):
            return "filtered"
        return "plain"
    return ""


class _TimedStream:
    """A streamed call that fires its request event when the stream ends."""

    def __init__(self, call: Any, fire: Callable[[int, BaseException | None], None]) -> None:
        self._call = call
        self._fire = fire
        self._length = 0
        self._done = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            response = next(self._call)
        except StopIteration:
            self._finish(None)
            raise
        except grpc.RpcError as exc:
            self._finish(exc)
            raise
        self._length += response.ByteSize()
        return response

    def _finish(self, exc: BaseException | None) -> None:
        if not self._done:
            self._done = True
            self._fire(self._length, exc)

    def __getattr__(self, name: str) -> Any:  # code(), details(), cancel(), ...
        return getattr(self._call, name)


class LocustInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """One Locust request event per call: RPC and mode as the name, time to the last reply."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment

    def _fire(self, name: str, start: float, length: int, exc: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=1000 * (time.perf_counter() - start),
            response_length=length,
            exception=exc,
            context={},
        )

    @staticmethod
    def _name(details: Any, request: Any = None) -> str:
        rpc = details.method.rsplit("/", 1)[-1]
        mode = _mode(request)
        return f"{rpc} [{mode}]" if mode else rpc

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        start = time.perf_counter()
        outcome = continuation(details, request)
        exc = outcome.exception()
        length = 0 if exc is not None else outcome.result().ByteSize()
        self._fire(self._name(details, request), start, length, exc)
        return outcome

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        start = time.perf_counter()
        name = self._name(details, request)
        return _TimedStream(
            continuation(details, request),
            lambda length, exc: self._fire(name, start, length, exc),
        )

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        start = time.perf_counter()
        name = self._name(details)
        return _TimedStream(
            continuation(details, requests),
            lambda length, exc: self._fire(name, start, length, exc),
        )


def _queries(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SystemExit(f"--icl-queries: cannot read {path}: {exc.strerror}") from None
    queries = [q.strip() for q in lines if q.strip() and not q.startswith("#")]
    if not queries:
        raise SystemExit(f"--icl-queries: {path} holds no queries")
    return queries


def _token(options: Any) -> str | None:
    if options.icl_token_file:
        try:
            return Path(options.icl_token_file).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise SystemExit(f"--icl-token-file: {exc.strerror}") from None
    return options.icl_token or None


def _tls(options: Any) -> TlsOptions | None:
    if not options.icl_ca_file:
        return None
    return TlsOptions(
        ca_file=Path(options.icl_ca_file),
        cert_file=Path(options.icl_cert_file) if options.icl_cert_file else None,
        key_file=Path(options.icl_key_file) if options.icl_key_file else None,
        server_name=options.icl_server_name or None,
    )


def _crop(rng: random.Random) -> bytes:
    """A small pedestrian-sized PNG: coloured bands (head, upper body, legs)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 192), (rng.randrange(256),) * 3)
    draw = ImageDraw.Draw(image)
    for top, bottom in ((0, 40), (40, 110), (110, 192)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.rectangle((8, top, 56, bottom), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class PersonSearchUser(User):
    """A camera-system backend: mostly searches, some with THI, a few enrolments."""

    host = DEFAULT_ADDRESS
    # Filled from the command line in _configure (Locust reads `tasks` when a user starts).
    tasks: ClassVar[Any] = []
    queries: ClassVar[list[str]] = []

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.timeout_s = options.icl_timeout_s
        self.cameras = [c for c in options.icl_cameras.split(",") if c]
        self.rng = random.Random()
        channel = open_channel(self.host, _tls(options), _token(options))
        self.channel = grpc.intercept_channel(channel, LocustInterceptor(self.environment))
        self.stub = pb_grpc.PersonSearchStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError:
            return None  # recorded as a failure by the interceptor

    def _request(self) -> pb.SearchRequest:
        return search_request(self.rng.choice(self.queries), top_k=self.options.icl_top_k)

    def _thi_request(self) -> pb.SearchRequest:
        request = self._request()
        request.thi.enabled = True
        request.thi.candidates = self.options.icl_thi_candidates
        if self.options.icl_thi_xi is not None:
            request.thi.xi = self.options.icl_thi_xi
        return request

    def plain_search(self) -> None:
        self._call(self.stub.Search, self._request())

    def filtered_search(self) -> None:
        request = self._request()
        if self.cameras:
            request.camera_ids.append(self.rng.choice(self.cameras))
        hour_ms = 3600 * 1000
        start = self.options.icl_day_start_ms + self.rng.randrange(8) * hour_ms
        request.time_range.start.FromMilliseconds(start)
        request.time_range.end.FromMilliseconds(start + 2 * hour_ms)
        self._call(self.stub.Search, request)

    def thi_search(self) -> None:
        self._call(self.stub.Search, self._thi_request())

    def thi_stream(self) -> None:
        try:
            for _ in self.stub.SearchStream(self._thi_request(), timeout=self.timeout_s):
                pass
        except grpc.RpcError:
            pass  # recorded as a failure by the interceptor

    def enroll(self) -> None:
        batch = pb.EnrollRequest(
            images=[
                gallery_image(
                    image_id=f"loadtest-{uuid.uuid4().hex}",
                    camera_id=LOADTEST_CAMERA,
                    captured_at=self.options.icl_day_start_ms,
                    image=_crop(self.rng),
                )
                for _ in range(self.options.icl_enroll_batch)
            ]
        )
        try:
            for _ in self.stub.Enroll(iter([batch]), timeout=self.timeout_s):
                pass
        except grpc.RpcError:
            pass


@events.init.add_listener
def _configure(environment: Any, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # a library run without the command line: keep the defaults
        return
    weights = {
        PersonSearchUser.plain_search: options.icl_plain_weight,
        PersonSearchUser.filtered_search: options.icl_filtered_weight,
        PersonSearchUser.thi_search: options.icl_thi_weight,
        PersonSearchUser.thi_stream: options.icl_stream_weight,
        PersonSearchUser.enroll: options.icl_enroll_weight,
    }
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise SystemExit("task weights: each >= 0 and at least one > 0")
    # Read once at start, so a bad file or token stops the run with one line.
    PersonSearchUser.queries = _queries(options.icl_queries)
    _token(options)
    # Whatever the command line leaves open comes from the shared client settings (ICL_ADDRESS,
    # ICL_TOKEN, ICL_CA_FILE, ... or the [client] table of ICL_CONFIG), as for the console.
    try:
        config = os.environ.get("ICL_CONFIG")
        client = ClientSettings.load(Path(config) if config else None)
    except ValueError as exc:
        raise SystemExit(f"client settings: {exc}") from None
    PersonSearchUser.host = client.address
    if not (options.icl_token or options.icl_token_file):
        options.icl_token = client.token.get_secret_value()
    if not options.icl_ca_file and client.ca_file:
        options.icl_ca_file = str(client.ca_file)
        options.icl_cert_file = options.icl_cert_file or str(client.cert_file or "")
        options.icl_key_file = options.icl_key_file or str(client.key_file or "")
    PersonSearchUser.tasks = list(
        itertools.chain.from_iterable([task] * weight for task, weight in weights.items())
    )


@events.test_stop.add_listener
def _cleanup(environment: Any, **_: Any) -> None:
    """Delete the crops the Enroll tasks stored, unless asked to keep them."""
    options = environment.parsed_options
    if options is None or options.icl_keep_enrolled or not options.icl_enroll_weight:
        return
    host = environment.host or PersonSearchUser.host
    channel = open_channel(host, _tls(options), _token(options))
    try:
        pb_grpc.PersonSearchStub(channel).Delete(
            delete_request(camera_ids=[LOADTEST_CAMERA]), timeout=options.icl_timeout_s
        )
    except grpc.RpcError as exc:
        environment.runner and print(f"cleanup: {exc.code().name}: {exc.details()}")
    finally:
        channel.close()


class SteppedRamp(LoadTestShape):
    """`-u` users at `-r` per second; with --icl-step-users N, N more every --icl-step-s
    seconds up to `-u` (a stepped ramp to find the knee). `-t` ends the run."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        options = self.runner.environment.parsed_options
        run_time = self.get_run_time()
        if options.run_time and run_time >= options.run_time:
            return None
        users = options.num_users or 1
        rate = options.spawn_rate or users
        if options.icl_step_users > 0:
            step = int(run_time // options.icl_step_s) + 1
            users = min(users, step * options.icl_step_users)
            rate = max(rate, float(options.icl_step_users))
        return users, rate
