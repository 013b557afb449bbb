"""The chat page of `cumo-mlx serve` in a real headless Chromium (Debian's chromium and
chromium-driver), driven by Selenium, against a real server on a local port."""

import base64
import json
import re
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from serving import start_server
from tiny_models import tiny_config, write_text_model

import cumo_mlx

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)

IMAGE = Path(__file__).resolve().parents[2] / "examples" / "shapes.png"
QUESTION = "What shape is this?"
KEY = "page-test-key"
MAX_TOKENS = 48  # the tiny model rambles: a short answer keeps the test quick
WAIT_S = 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("tiny-page"), tiny_config())


@pytest.fixture(scope="module")
def server(model_dir):
    """`cumo-mlx serve` with the tiny model and an API key, on a free local port: its base URL."""
    process, port, lines = start_server(model_dir, "--api-key", KEY)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    assert process.wait(30) == 0, "".join(lines)


@pytest.fixture(scope="module")
def driver():
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield browser
    browser.quit()


class Page:
    """The chat page, freshly loaded with the API key saved; `expected_errors` are console error
    fragments a test provokes on purpose; screenshots go to the folder `screenshots`."""

    def __init__(self, driver, url, screenshots):
        self.driver, self.url, self.screenshots = driver, url, screenshots
        self.expected_errors: list[str] = []

    def open(self):
        self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        self.driver.get(f"{self.url}/static/app.css")  # same origin: set the settings before the page reads them
        settings = json.dumps({"api_key": KEY})
        self.driver.execute_script("localStorage.setItem('cumo-chat-settings', arguments[0])", settings)
        self.driver.get_log("browser")  # (a stylesheet shown as a page asks for /favicon.ico)
        self.driver.get(self.url + "/")
        self.wait(lambda d: self.by_id("model-name").text not in ("", "connecting…"))
        return self

    def el(self, testid):
        return self.driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def all(self, testid):
        return self.driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def by_id(self, element_id):
        return self.driver.find_element(By.ID, element_id)

    def wait(self, condition, timeout=WAIT_S):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(condition)

    def set_field(self, element, value):
        if not element.is_displayed():  # settings start folded on phones
            self.by_id("settings-toggle").click()
        element.clear()
        element.send_keys(str(value))

    def ask(self, question, image=None, max_tokens=MAX_TOKENS):
        if image is not None:
            self.el("image-input").send_keys(str(image))
            self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
        self.set_field(self.el("temperature"), 0)
        self.set_field(self.by_id("max-tokens"), max_tokens)
        self.el("prompt").send_keys(question)
        answers = len(self.all("message-assistant"))
        self.el("send").click()
        self.wait(lambda d: len(self.all("message-assistant")) == answers + 1)

    def wait_done(self):
        return self.wait(lambda d: self.all("done") and self.all("done")[-1])

    def messages(self):
        return self.driver.execute_script("return cumoChat.messages()")

    def paste(self, path, event="paste"):
        """Dispatch a paste (or drop) event carrying the file, as a browser does."""
        data = base64.b64encode(Path(path).read_bytes()).decode()
        self.driver.execute_script(
            """
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], arguments[1], { type: "image/png" }));
            const event = arguments[2] === "paste"
              ? new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true })
              : new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
            document.activeElement.dispatchEvent(event);
            """,
            data, Path(path).name, event,
        )  # fmt: skip

    def console_errors(self):
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(expected in entry["message"] for expected in self.expected_errors)
        ]


def cancelled(url) -> float:
    """The server's count of generations cancelled (/metrics)."""
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return float(re.search(r"^cumo_mlx_cancelled_total (\S+)$", response.read().decode(), re.M).group(1))


@pytest.fixture
def page(driver, server, tmp_path):
    """The page loaded afresh; after the test, no console error it did not provoke on purpose."""
    page = Page(driver, server, tmp_path).open()
    yield page
    assert page.console_errors() == []


@pytest.fixture(scope="module")
def tiny_model(model_dir):
    return cumo_mlx.load(model_dir)


def test_answer_equals_generate(page, tiny_model):
    """Attach the bundled image, ask with Enter at temperature 0: the answer is `generate`'s."""
    page.el("image-input").send_keys(str(IMAGE))
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
    page.set_field(page.el("temperature"), 0)
    page.set_field(page.by_id("max-tokens"), MAX_TOKENS)
    page.el("prompt").send_keys(QUESTION, Keys.ENTER)
    done = page.wait_done()
    expected = cumo_mlx.generate(*tiny_model, QUESTION, [IMAGE], temp=0.0, max_tokens=MAX_TOKENS)
    assert page.messages() == [
        {"role": "user", "text": QUESTION, "images": 1},
        {"role": "assistant", "text": expected, "images": 0},
    ]
    assert page.el("message-assistant").find_element(By.CLASS_NAME, "body").text.split() == expected.split()  # as it is
    assert page.el("message-user").find_elements(By.CSS_SELECTOR, "img")  # the image is shown in the turn
    assert "s to first token" in done.text and "tokens/s" in done.text
    assert page.el("prompt").get_attribute("value") == "" and not page.driver.find_elements(By.CSS_SELECTOR, "#attachments img")
    page.driver.save_screenshot(str(page.screenshots / "chat-desktop.png"))


def test_shift_enter_adds_a_line_and_settings_persist(page):
    prompt = page.el("prompt")
    prompt.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert prompt.get_attribute("value") == "first line\nsecond line" and not page.all("message-user")
    page.set_field(page.el("temperature"), 0.5)
    page.set_field(page.by_id("top-p"), 0.9)
    page.driver.refresh()
    assert page.el("temperature").get_attribute("value") == "0.5"
    assert page.by_id("top-p").get_attribute("value") == "0.9"
    assert page.by_id("max-tokens").get_attribute("value") == "512"  # CuMo's demo default, kept


def test_stop_mid_answer_then_second_turn(page, tiny_model):
    """Stop aborts the stream; the next turn sends the whole conversation, earlier image included."""
    page.driver.execute_script(
        """window.sentBodies = [];
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          if (url === "/v1/chat/completions") window.sentBodies.push(JSON.parse(init.body));
          return realFetch(url, init);
        };"""
    )
    page.ask(QUESTION, IMAGE, max_tokens=3000)
    page.wait(lambda d: page.el("message-assistant").text.strip())
    page.el("stop").click()
    done = page.wait_done()
    assert "stopped" in done.text
    page.wait(lambda d: cancelled(page.url) == 1)  # the server noticed and stopped generating
    partial, full = page.messages()[1]["text"], ""
    for response in cumo_mlx.stream_generate(*tiny_model, QUESTION, [IMAGE], temp=0.0, max_tokens=3000):
        full += response.text
        if len(full) > len(partial):
            break
    assert partial and len(partial) < len(full) and full.startswith(partial)  # cut short
    assert page.el("send").is_displayed() and not page.el("stop").is_displayed()

    page.ask("What colour is it?")
    assert "stopped" not in page.wait_done().text
    second = page.driver.execute_script("return window.sentBodies[1].messages")
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0]["content"][0] == {"type": "image_url", "image_url": {"url": second[0]["content"][0]["image_url"]["url"]}}
    assert second[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert second[1]["content"] == partial and second[2]["content"] == "What colour is it?"
    assert len(page.all("message-assistant")) == 2 and page.messages()[3]["text"]


def test_large_image_is_downscaled(page, tmp_path):
    """A photo-sized image is shrunk in the browser to at most 1008 px a side before it is sent."""
    Image.new("RGB", (2400, 1200), (200, 30, 30)).save(tmp_path / "large.png")
    page.el("image-input").send_keys(str(tmp_path / "large.png"))
    thumbnail = page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))[0]
    page.wait(lambda d: d.execute_script("return arguments[0].complete", thumbnail))
    assert page.driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", thumbnail) == [1008, 504]
    assert thumbnail.get_attribute("src").startswith("data:image/png;base64,")


def test_paste_drop_remove_regenerate_clear(page):
    page.paste(IMAGE)
    page.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 1)
    page.paste(IMAGE, event="drop")
    page.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) == 2)
    page.driver.find_element(By.CSS_SELECTOR, '#attachments [aria-label="Remove image 2"]').click()
    assert len(page.driver.find_elements(By.CSS_SELECTOR, "#attachments img")) == 1
    page.ask(QUESTION)
    page.wait_done()
    first = page.messages()
    assert first[0]["images"] == 1 and first[1]["text"]
    page.by_id("regenerate").click()
    page.wait_done()
    assert page.messages() == first  # greedy: the same answer again, in place of the old one
    assert len(page.all("message-assistant")) == 1
    page.by_id("clear").click()
    assert page.messages() == [] and not page.all("message-user") and not page.all("message-assistant")


def test_server_errors_are_shown(page):
    page.expected_errors = ["401", "400"]  # the browser logs failed requests
    page.set_field(page.by_id("api-key"), "wrong-key")
    page.ask(QUESTION)
    page.wait_done()
    error = page.el("error")
    assert error.is_displayed() and error.text.startswith("401") and len(error.text) > 5
    assert page.messages() == [{"role": "user", "text": QUESTION, "images": 0}]  # the failed answer is not sent again
    page.set_field(page.by_id("api-key"), KEY)
    page.by_id("regenerate").click()  # the question again, now with the right key
    page.wait_done()
    assert [m["role"] for m in page.messages()] == ["user", "assistant"] and page.messages()[1]["text"]
    page.ask(QUESTION, max_tokens=-3)
    page.wait(lambda d: len(page.all("error")) == 2)
    assert page.all("error")[1].text.startswith("400") and "max_tokens" in page.all("error")[1].text


def test_expert_view(page):
    """After an answer about an image the expert view shows every site; shares sum to 100%."""
    assert not page.el("experts").is_displayed()  # folded until there is something to show
    page.ask(QUESTION, IMAGE)
    page.wait_done()
    page.wait(lambda d: page.el("experts").is_displayed() and d.find_elements(By.CSS_SELECTOR, "#experts-legend li"))
    sites = [option.text for option in page.el("experts-site").find_elements(By.TAG_NAME, "option")]
    assert sites == [f"CLIP layer {i}, scale {s}" for i in (0, 1) for s in (1, 3)] + ["connector"]
    for index in range(len(sites)):
        page.driver.execute_script(
            "const s = document.getElementById('experts-site'); s.value = arguments[0]; s.dispatchEvent(new Event('change'))",
            str(index),
        )
        legend = page.driver.find_elements(By.CSS_SELECTOR, "#experts-legend li")
        shares = [float(item.get_attribute("data-share")) for item in legend]
        assert len(shares) == 4 and sum(shares) == pytest.approx(100.0)
        assert sites[index] in page.by_id("experts-canvas").get_attribute("aria-label")
    # the canvas holds the tinted image, not a blank
    colours = page.driver.execute_script(
        """const c = document.getElementById('experts-canvas').getContext('2d').getImageData(0, 0, 672, 672).data;
        const seen = new Set(); for (let i = 0; i < c.length; i += 4 * 97) seen.add(c[i] + ',' + c[i + 1] + ',' + c[i + 2]);
        return seen.size;"""
    )
    assert colours > 3
    assert "dense" in page.el("token-routes").text  # a Mistral LLM: the view says why there are no token routes
    page.el("experts-toggle").click()
    assert not page.el("experts").is_displayed()
    page.el("experts-toggle").click()
    assert page.el("experts").is_displayed()
    page.driver.save_screenshot(str(page.screenshots / "experts-desktop.png"))


def test_token_routes_colour_the_answer(page):
    """For a Mixtral backbone the answer's tokens are coloured by expert at the chosen layer
    (the routes response is extended in the browser here; the server side is test_expert_view's)."""
    page.driver.execute_script(
        """const realFetch = window.fetch;
        window.fetch = async (url, init) => {
          const response = await realFetch(url, init);
          if (url !== "/v1/cumo/routes") return response;
          const body = await response.json();
          body.tokens = { available: true, layers: ["LLM layer 0", "LLM layer 1"], num_experts: 4,
            tokens: [{ text: "A", experts: [0, 3] }, { text: " <b>red</b>", experts: [1, 2] }] };
          return new Response(JSON.stringify(body), { headers: { "Content-Type": "application/json" } });
        };"""
    )
    page.ask(QUESTION, IMAGE, max_tokens=4)
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#token-routes .tokens span"))
    spans = page.driver.find_elements(By.CSS_SELECTOR, "#token-routes .tokens span")
    assert [s.get_attribute("textContent") for s in spans] == ["A", " <b>red</b>"]  # as text
    assert [s.get_attribute("title") for s in spans] == ["expert 0", "expert 1"]
    page.driver.execute_script(
        "const s = document.getElementById('token-layer'); s.value = '1'; s.dispatchEvent(new Event('change'))"
    )
    spans = page.driver.find_elements(By.CSS_SELECTOR, "#token-routes .tokens span")
    assert [s.get_attribute("title") for s in spans] == ["expert 3", "expert 2"]


def test_answer_markup_is_shown_as_text(page):
    """No HTML or script from an answer runs: the renderer escapes it, and a streamed answer holding
    it (a stub server response) shows it as text, with its Markdown rendered."""
    hostile = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> [x](javascript:alert(1))'
    html = page.driver.execute_script("return cumoChat.markdown(arguments[0])", hostile)
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html and "href" not in html
    answer = f"**bold** and `code`\n\n```html\n{hostile}\n```\n{hostile}"
    chunks = [answer[i : i + 7] for i in range(0, len(answer), 7)]
    page.driver.execute_script(
        """const chunks = arguments[0];
        window.fetch = async () => new Response(new ReadableStream({ start(controller) {
          const encoder = new TextEncoder();
          for (const c of chunks) controller.enqueue(encoder.encode(
            "data: " + JSON.stringify({ choices: [{ index: 0, delta: { content: c } }] }) + "\\n\\n"));
          controller.enqueue(encoder.encode("data: [DONE]\\n\\n"));
          controller.close();
        } }), { headers: { "Content-Type": "text/event-stream" } });""",
        chunks,
    )
    page.ask("Say something")
    page.wait_done()
    body = page.el("message-assistant").find_element(By.CLASS_NAME, "body")
    assert not body.find_elements(By.CSS_SELECTOR, "script, img, a")
    assert body.find_element(By.TAG_NAME, "strong").text == "bold" and body.find_element(By.TAG_NAME, "code").text == "code"
    assert body.find_element(By.TAG_NAME, "pre").text == hostile
    assert hostile in body.text and page.driver.execute_script("return window.pwned") is None


def test_phone_width(page):
    page.driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )
    page.driver.refresh()
    page.ask(QUESTION, IMAGE)
    page.wait_done()
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#experts-legend li"))
    width = page.driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1]  # nothing wider than the phone
    page.driver.save_screenshot(str(page.screenshots / "chat-phone.png"))
