"""Browser check of the chat page: headless Chromium types a message and sees a streamed reply.

Not part of the pytest suite (it needs Chromium and its driver). Run it with

    apt-get install chromium chromium-driver && pip install selenium
    python tests/browser_check.py [--model output/sft]

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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory; default: a tiny random model")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tmp = tempfile.mkdtemp()
    port = free_port()
    model = args.model or tiny_model(tmp)
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "code", "serve.py"), "--model", model,
                               "--port", str(port), "--device", "cpu"])
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):  # wait for the server, at most a minute
            try:
                urllib.request.urlopen(url + "health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(flag)
        if shutil.which("chromium"):
            options.binary_location = shutil.which("chromium")
        service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.get(url)
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("20")
        driver.find_element(By.ID, "input").send_keys("你好\n")
        # the reply streams in: the assistant line grows past its prefix, then Send is enabled again
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == 1
                   and len(d.find_element(By.CSS_SELECTOR, ".assistant").text) > len("assistant: "))
        wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())
        user = driver.find_element(By.CSS_SELECTOR, ".user").text
        reply = driver.find_element(By.CSS_SELECTOR, ".assistant").text
        assert user == "user: 你好", user
        assert not reply.startswith("assistant: error"), reply
        print(f"browser check passed: {user!r} -> {reply!r}")
    finally:
        if driver:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
