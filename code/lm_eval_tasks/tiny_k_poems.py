"""process_results of tiny_k_poems.yaml: what each poem adds to bits per character (and per byte)."""


def process_results(doc, results):
    """(log-likelihood of "poem </s>", size of the poem): lm-eval's bits_per_byte aggregation
    turns the pairs into -sum(log-likelihoods) / ln 2 / sum(sizes)."""
    (loglikelihood,) = results
    text = doc["text"]
    return {"bits_per_char": (loglikelihood, len(text)), "bits_per_byte": (loglikelihood, len(text.encode("utf-8")))}
