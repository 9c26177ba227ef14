"""The live page of ``examples/`` in a real browser: headless Chromium from the
distribution, driven through its chromedriver (nothing is downloaded).

Seven topics share one ``EventSource`` while ``fetch`` still gets through;
the page fails over by itself from a stopped instance to another one behind a
small load balancer and shows every event once; after a restart it shows a
reset notice, then live events. WebDriver calls block, so they run in a
thread while the IOLoop serves the page.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from ssepg import Config, Service
from ssepg.server import page_routes
from ssepg.service import bound_port, make_app

from support import TEST_CONFIG, Running, http, publish, unique_topic, wait_until

pytestmark = pytest.mark.browser

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STATIC_PATH = str(Path(__file__).resolve().parent.parent / "examples" / "static")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module, with a fresh profile."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _unavailable(f"{path} not found: install chromium and chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"
    )
    # With the driver's path given, Selenium never looks for (or downloads)
    # a driver or browser of its own.
    driver = webdriver.Chrome(
        service=DriverService(executable_path=CHROMEDRIVER), options=options
    )
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The live page in the browser, read and driven through the DOM."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(fn, *args)
        )

    async def open(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, source, *args)

    async def state(self) -> dict[str, Any]:
        state: dict[str, Any] = await self.script("""
            const status = document.getElementById("status");
            return {
              status: status.dataset.state,
              published: document.getElementById("pub-result").textContent,
              log: [...document.querySelectorAll("#log li")].map((li) => ({
                kind: li.classList.contains("event") ? "event" : li.className,
                topic: li.dataset.topic, id: li.dataset.id,
                data: li.querySelector(".data").textContent,
              })),
            };
        """)
        return state

    async def wait_for(self, predicate: Any, message: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def check() -> bool:
            seen.update(await self.state())
            return bool(predicate(seen))

        await wait_until(check, interval=0.05, message=message)
        return seen

    async def publish(self, topic: str, data_json: str) -> str:
        """Publish through the page's form (a fetch); returns the event id."""
        before = (await self.state())["published"]
        await self.script(
            """
            document.getElementById("pub-topic").value = arguments[0];
            document.getElementById("pub-data").value = arguments[1];
            document.querySelector("#publish button").click();
        """,
            topic,
            data_json,
        )
        state = await self.wait_for(
            lambda s: s["published"] != before and s["published"], "publish answer"
        )
        assert state["published"].startswith("published "), state["published"]
        return str(state["published"].split()[1])


async def _start(services: Any, port: int = 0, **overrides: Any) -> Running:
    """A service serving the live page at ``/`` besides its own routes."""
    service = await Service.start(Config(**{**TEST_CONFIG, **overrides}))
    app = make_app(service)
    app.add_handlers(r".*", page_routes(service, STATIC_PATH))
    running = Running(service, bound_port(service.listen(port, "127.0.0.1", app=app)))
    services.running.append(running)
    if service.config.dsn:
        await wait_until(
            lambda: service.broker.is_connected, message="listener connected"
        )
    return running


HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


class _Balancer(tornado.web.RequestHandler):
    """A minimal HTTP load balancer: each request goes to the first backend
    that accepts a connection, and the answer streams back as it arrives
    (an event stream never ends on its own, so it cannot be buffered)."""

    def initialize(self, ports: list[int]) -> None:
        self.ports = ports

    async def get(self) -> None:
        upstream = None
        for port in self.ports:
            try:
                upstream = await TCPClient().connect("127.0.0.1", port)
                break
            except OSError:
                continue
        if upstream is None:
            raise tornado.web.HTTPError(502)
        body = self.request.body
        lines = [
            f"{self.request.method} {self.request.uri} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Connection: close",
            f"Content-Length: {len(body)}",
        ]
        lines += [
            f"{k}: {v}"
            for k, v in self.request.headers.get_all()
            if k.lower() not in HOP_BY_HOP
        ]
        try:
            await upstream.write(
                "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body
            )
            head = await upstream.read_until(b"\r\n\r\n", max_bytes=65536)
        except StreamClosedError:
            upstream.close()
            raise tornado.web.HTTPError(502) from None
        status, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        self.set_status(int(status.split()[1]))
        names: set[str] = set()
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.lower() in HOP_BY_HOP:
                continue
            if name.lower() in names:
                self.add_header(name, value.strip())
            else:
                self.set_header(name, value.strip())
                names.add(name.lower())
        try:
            while True:
                self.write(await upstream.read_bytes(65536, partial=True))
                await self.flush()
        except StreamClosedError:
            pass  # the backend finished (or went away), or the browser left
        finally:
            upstream.close()

    post = options = get


async def _balancer(ports: list[int]) -> tuple[tornado.httpserver.HTTPServer, int]:
    app = tornado.web.Application(
        [(r".*", _Balancer, {"ports": ports})], log_function=lambda handler: None
    )
    server = tornado.httpserver.HTTPServer(app)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    return server, int(sockets[0].getsockname()[1])


def _by_topic(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e["topic"], []).append(e["id"])
    return out


@pytest.mark.gen_test(timeout=120)
async def test_seven_topics_share_one_stream_while_fetch_completes(services, browser):
    a = await _start(services)
    page = Page(browser)
    topics = [unique_topic(f"p{n}") for n in range(7)]
    try:
        await page.open(f"http://127.0.0.1:{a.port}/?topics={','.join(topics)}")
        await page.wait_for(lambda s: s["status"] == "open", "the page listening")
        assert a.service.dispatcher.stream_count == 1

        # Each publish from the page is a fetch to the same origin; with one
        # connection per topic, seven streams would leave it none.
        expected = []
        for n, topic in enumerate(topics):
            expected.append(
                (topic, await page.publish(topic, f'{{"from": "page", "n": {n}}}'))
            )
            body = await publish(a, topic, {"from": "server", "n": n})
            expected.append((topic, body["id"]))
        state = await page.wait_for(
            lambda s: sum(e["kind"] == "event" for e in s["log"]) >= 14, "14 events"
        )
        events = [e for e in state["log"] if e["kind"] == "event"]
        assert [(e["topic"], e["id"]) for e in events] == expected
        assert [e["data"] for e in events[:2]] == [
            '{"from":"page","n":0}',
            '{"from":"server","n":0}',
        ]
        assert a.service.dispatcher.stream_count == 1
        assert state["status"] == "open"
        assert [e for e in state["log"] if e["kind"] != "event"] == []
    finally:
        await page.open("about:blank")


@pytest.mark.gen_test(timeout=180)
async def test_page_fails_over_to_another_instance_and_shows_every_event_once(
    services, browser, pg_dsn
):
    a = await _start(services, dsn=pg_dsn)
    b = await _start(services, dsn=pg_dsn)
    balancer, port = await _balancer([a.port, b.port])
    page = Page(browser)
    topics = [unique_topic(f"f{n}") for n in range(3)]
    published: list[str] = []
    try:
        await page.open(f"http://127.0.0.1:{port}/?topics={','.join(topics)}")
        await page.wait_for(lambda s: s["status"] == "open", "the page listening")
        assert (
            a.service.dispatcher.stream_count,
            b.service.dispatcher.stream_count,
        ) == (1, 0)
        for n in range(6):
            published.append((await publish(a, topics[n % 3], {"n": n}))["id"])
        await page.wait_for(lambda s: len(s["log"]) >= 6, "events before the failover")

        # Stop the instance the page is on; while the page reconnects, b
        # takes more events, which it must replay to the page.
        await a.service.close(drain=0)
        for n in range(6, 12):
            published.append((await publish(b, topics[n % 3], {"n": n}))["id"])
        await wait_until(
            lambda: b.service.dispatcher.stream_count == 1,
            timeout=30,
            message="the page on instance b",
        )
        await page.wait_for(lambda s: s["status"] == "open", "the page listening again")
        for n in range(12, 15):
            published.append(await page.publish(topics[n % 3], f'{{"n": {n}}}'))
        state = await page.wait_for(lambda s: len(s["log"]) >= 15, "every event")
        ids = [e["id"] for e in state["log"] if e["kind"] == "event"]
        assert len(ids) == len(set(ids)), "an event was shown twice"
        assert ids == published
        assert [e["kind"] for e in state["log"]] == ["event"] * 15
        assert [int(e["data"].strip("{}").split(":")[1]) for e in state["log"]] == list(
            range(15)
        )
    finally:
        await page.open("about:blank")
        balancer.stop()
        await balancer.close_all_connections()


@pytest.mark.gen_test(timeout=120)
async def test_page_shows_a_reset_then_live_events_after_a_restart(services, browser):
    first = await _start(services)
    page = Page(browser)
    x, y = unique_topic("x"), unique_topic("y")
    try:
        await page.open(f"http://127.0.0.1:{first.port}/?topics={x},{y}")
        await page.wait_for(lambda s: s["status"] == "open", "the page listening")
        before = (await publish(first, x, "before"))["id"]
        await page.wait_for(lambda s: len(s["log"]) == 1, "an event before the restart")

        # The new instance never heard the page's last id: a reset per topic.
        await first.service.close(drain=0)
        second = await _start(services, port=first.port)
        await wait_until(
            lambda: second.service.dispatcher.stream_count == 1,
            timeout=30,
            message="the page back",
        )
        after = (await publish(second, y, "after"))["id"]
        state = await page.wait_for(
            lambda s: len(s["log"]) == 4, "reset notices and an event"
        )
        log = state["log"]
        assert (log[0]["kind"], log[0]["id"], log[0]["data"]) == (
            "event",
            before,
            '"before"',
        )
        assert sorted((e["kind"], e["topic"]) for e in log[1:3]) == sorted(
            [("notice reset", x), ("notice reset", y)]
        )
        assert (log[3]["kind"], log[3]["topic"], log[3]["id"]) == ("event", y, after)
        assert state["status"] == "open"
        health = await http("GET", second.url("/healthz"))
        assert health.code == 200
    finally:
        await page.open("about:blank")


LISTEN_ACROSS_ORIGINS = """
    const [url, withCredentials, publishUrl, done] = arguments;
    const es = new EventSource(url, {withCredentials});
    let publishing = null;
    es.onopen = () => {
      if (!publishUrl) return;
      // A JSON body makes this a preflighted request.
      publishing = fetch(publishUrl, {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({data: {across: true}}),
      }).then((response) => response.json()).then((body) => body.id);
      publishing.catch((err) => {
        es.close();
        done({error: "fetch: " + err.message});
      });
    };
    es.onmessage = async (e) => {
      es.close();
      const published = publishing ? await publishing : null;
      done({id: e.lastEventId, data: e.data, published});
    };
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) done({error: "refused"});
    };
"""

FETCH_ACROSS_ORIGINS = """
    const [url, body, done] = arguments;
    fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body})
      .then(async (r) => done({status: r.status, body: await r.json()}))
      .catch((err) => done({error: err.name}));
"""


@pytest.mark.gen_test(timeout=120)
async def test_pages_on_other_origins_need_cors(services, browser):
    home = await _start(services)
    origin = f"http://127.0.0.1:{home.port}"
    exact = await _start(services, cors_origins=(origin,))
    anyone = await _start(services, cors_origins=("*",))
    closed = await _start(services)
    page = Page(browser)
    topic = unique_topic()

    async def listen(
        api: Running, credentials: bool, publish_too: bool
    ) -> dict[str, Any]:
        url = api.url(f"/topics/{topic}/events")
        result: dict[str, Any] = await page.call(
            browser.execute_async_script,
            LISTEN_ACROSS_ORIGINS,
            url,
            credentials,
            url if publish_too else None,
        )
        return result

    async def post(url: str, body: str) -> dict[str, Any]:
        result: dict[str, Any] = await page.call(
            browser.execute_async_script, FETCH_ACROSS_ORIGINS, url, body
        )
        return result

    try:
        await page.open(f"{origin}/?topics={topic}")
        # An exact origin may send credentials, and publish with a preflight.
        got = await listen(exact, True, True)
        assert got["data"] == '{"across":true}'
        assert got["id"] == got["published"] and got["id"]

        # The wildcard serves any page, but never one sending credentials.
        pending = asyncio.ensure_future(listen(anyone, False, False))
        await wait_until(
            lambda: anyone.service.dispatcher.stream_count == 1,
            message="the cross-origin stream",
        )
        body = await publish(anyone, topic, "to anyone")
        assert await pending == {
            "id": body["id"],
            "data": '"to anyone"',
            "published": None,
        }
        assert await listen(anyone, True, False) == {"error": "refused"}

        # An origin not listed gets nothing it could read, and its preflight
        # fails, so the publish is never even sent.
        assert await listen(closed, False, False) == {"error": "refused"}
        url = closed.url(f"/topics/{topic}/events")
        refused = await post(url, '{"data": 1}')
        assert refused == {"error": "TypeError"}
        assert closed.service.dispatcher.published == 0

        # A listed origin can read why a request failed.
        failed = await post(exact.url(f"/topics/{topic}/events"), '{"nodata": 1}')
        assert failed == {"status": 400, "body": {"error": "missing data"}}
    finally:
        await page.open("about:blank")
