"""Browser check of the chat page: headless Chromium types a message and sees a streamed reply.

It also checks the API key field (the server runs with TINYK_API_KEY set), the model line in the
header, and that a failed request (a 400 for an over-long message, then a stopped server) shows a
red error and leaves nothing behind: the next request's body carries no empty assistant turn and
not the failed question.

Not part of the pytest suite (it needs Chromium and its driver). Run it with

    apt-get install chromium chromium-driver && pip install selenium
    python tests/browser_check.py [--model output/sft] [--screenshot page.png]

Without --model it serves a tiny random model (the page is what is checked, not the answer).
It starts code/serve.py on 127.0.0.1, drives the page, and stops the server; exit 0 = passed.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "code"))


def tiny_model(directory: str) -> str:
    """A random 64-dim model with a tokenizer trained on a few sentences."""
    import torch
    from k_model import ModelConfig, Transformer
    from train_tokenizer import train_tokenizer
    corpus = os.path.join(directory, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for text in ["你好，很高兴见到你。", "今天天气很好。", "Hello, how are you?"] * 30:
            f.write('{"text": "%s"}\n' % text)
    model_dir = os.path.join(directory, "model")
    train_tokenizer([corpus], model_dir, vocab_size=400)
    torch.manual_seed(0)
    Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400,
                            max_seq_len=256)).save_pretrained(model_dir)
    return model_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY = "browser-check-key"
# the page wraps nothing itself: record each request body the page hands to fetch()
RECORD_BODIES = """
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body) window.sentBodies.push(JSON.parse(options.body));
  return realFetch(url, options);
};
"""


def start_server(model: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "code", "serve.py"), "--model", model,
                               "--port", str(port), "--device", "cpu"], env={**os.environ, "TINYK_API_KEY": KEY})
    for _ in range(120):  # wait for the server, at most a minute
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not start")


def stop_server(server: subprocess.Popen):
    server.terminate()
    server.wait(timeout=30)


def check_no_leftovers(messages, failed):
    """The history rule: only completed exchanges, so no empty assistant turn and no failed question."""
    assert messages[-1]["role"] == "user", messages
    assert all(m["content"].strip() for m in messages if m["role"] == "assistant"), messages
    assert not any(m["content"] in failed for m in messages), messages
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], roles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory; default: a tiny random model")
    parser.add_argument("--screenshot", help="save a picture of the page at the end here; default: none")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tmp = tempfile.mkdtemp()
    port = free_port()
    model = args.model or tiny_model(tmp)
    server = start_server(model, port)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(flag)
        if shutil.which("chromium"):
            options.binary_location = shutil.which("chromium")
        service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        info = lambda d: d.find_element(By.ID, "model-info").text  # noqa: E731
        wait.until(lambda d: "API key" in info(d))  # the server wants a key the page does not have yet
        driver.find_element(By.ID, "api_key").send_keys(KEY + "\t")  # "change" fires on leaving the field
        wait.until(lambda d: info(d).startswith("模型 "))
        header = info(driver)
        assert "上下文" in header and "tokens" in header, header
        driver.execute_script(RECORD_BODIES)
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("20")
        errors = lambda d: d.find_elements(By.CSS_SELECTOR, ".error")  # noqa: E731

        # 1. a message over the context window: the server answers 400
        too_long = "很长的问题" * 200
        driver.find_element(By.ID, "input").send_keys(too_long + "\n")
        wait.until(lambda d: len(errors(d)) == 1 and d.find_element(By.ID, "send").is_enabled())
        error = errors(driver)[0]
        assert error.value_of_css_property("color") == "rgba(176, 0, 32, 1)", error.value_of_css_property("color")
        assert "failed" in driver.find_element(By.CSS_SELECTOR, ".user").get_attribute("class")
        assert not driver.find_elements(By.CSS_SELECTOR, ".assistant"), "an error is not an assistant message"
        assert driver.find_element(By.ID, "input").get_attribute("value") == too_long  # back, to edit and retry
        driver.find_element(By.ID, "input").clear()

        # 2. a normal message: the reply streams in, and the request carried no trace of the failure
        driver.find_element(By.ID, "input").send_keys("你好\n")
        # the reply streams in: the assistant line grows past its prefix, then Send is enabled again
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == 1
                   and len(d.find_element(By.CSS_SELECTOR, ".assistant").text) > len("assistant: "))
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        user = driver.find_elements(By.CSS_SELECTOR, ".user")[-1].text
        reply = driver.find_element(By.CSS_SELECTOR, ".assistant").text
        assert user == "user: 你好", user
        assert len(errors(driver)) == 1, "the reply is not an error"
        bodies = driver.execute_script("return window.sentBodies")
        assert bodies[-1]["messages"] == [{"role": "user", "content": "你好"}], bodies[-1]["messages"]

        # 3. the server goes away: a network error, shown as such
        stop_server(server)
        driver.find_element(By.ID, "input").send_keys("还在吗\n")
        wait.until(lambda d: len(errors(d)) == 2 and d.find_element(By.ID, "send").is_enabled())
        wait.until(lambda d: "cannot reach" in info(d))
        driver.find_element(By.ID, "input").clear()
        server = start_server(model, port)

        # 4. back up: the next request carries the completed exchange only
        driver.find_element(By.ID, "input").send_keys("再见\n")
        wait.until(lambda d: len(d.execute_script("return window.sentBodies")) == len(bodies) + 2
                   and d.find_element(By.ID, "send").is_enabled())
        messages = driver.execute_script("return window.sentBodies")[-1]["messages"]
        check_no_leftovers(messages, failed={too_long, "还在吗"})
        wait.until(lambda d: info(d) == header)  # the header saw the server go, and come back
        assert len(errors(driver)) == 2, [e.text for e in errors(driver)]
        if args.screenshot:
            driver.save_screenshot(args.screenshot)
        print(f"browser check passed: {header!r}; {user!r} -> {reply!r}; errors: "
              f"{[e.text[:60] for e in errors(driver)]}; last request: {[m['role'] for m in messages]}")
    finally:
        if driver:
            driver.quit()
        stop_server(server)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
