"""Rebuild the embedded chat corpus (`activations/data/chat_corpus.jsonl.xz`).

Maintainers only: users never run this, the compressed corpus ships in the repo.

    python activations/data/build_chat_corpus.py            # about 20 minutes on a 2-core CPU

Origin: SmolLM2-135M-Instruct's own answers (the embedded default model, Apache-2.0; its
answers carry no further licence) to a fixed, varied set of user requests written here:
every request form of `REQUESTS` crossed with every subject of `SUBJECTS`, plus the
subject-free `OPEN_REQUESTS`, drawn in a fixed order by a seeded generator. Answers are
sampled (temperature 0.8, seed fixed, at most `--max-new-tokens` tokens), so the text is the
model's own chat register, which the default corpus (books and documentation) lacks.

Each document is the whole conversation in the model's chat template (system turn, user
turn, assistant turn, with the template's markers), as the model sees it when a user chats
with it. The held-out split is fixed by a hash of each document id, as in the default corpus.

The subjects name none of the concepts of `bench/concept_steering.py` (love, marriage,
music, food, the sea, Python) nor their lexicon words, so features for those concepts can
only come from what the model brings up by itself. No request is one of the steering
benches' tuning or report prompts.

Resumable: finished batches are kept in `<out>.partial.jsonl`, and a rerun continues there.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from activations.data.build_default_corpus import write_corpus  # noqa: E402

SUBJECTS = [
    "the weather", "gardening", "a houseplant", "saving money", "a first job", "public transport", "a rainy morning",
    "the night sky", "mountains", "a desert", "a forest walk", "birds", "cats", "dogs", "horses", "insects",
    "volcanoes", "the moon", "planets", "electricity", "magnets", "batteries", "solar panels", "the internet",
    "smartphones", "video games", "board games", "chess", "football", "tennis", "running", "cycling", "swimming lessons",
    "yoga", "sleep", "stress", "a job interview", "a difficult colleague", "teamwork", "leadership", "time management",
    "learning mathematics", "geometry", "fractions", "statistics", "the history of writing", "ancient Rome",
    "the printing press", "the industrial revolution", "castles", "trains", "bridges", "skyscrapers", "cars",
    "electric vehicles", "recycling", "climate", "rain and snow", "earthquakes", "medicine", "vaccines", "the human heart",
    "the brain", "memory", "dreams", "friendship", "neighbours", "a small town", "a big city", "moving house",
    "painting", "photography", "drawing", "poetry", "a library", "reading habits", "newspapers", "podcasts", "films",
    "theatre", "museums", "architecture", "furniture", "cleaning the house", "laundry", "a broken bicycle",
    "fixing a leaky tap", "shopping", "clothes", "winter", "summer holidays", "a camping trip", "a road trip", "maps",
    "languages", "grammar", "spelling", "handwriting", "computers", "spreadsheets", "email etiquette", "passwords",
    "robots", "space travel", "astronauts", "telescopes", "microscopes", "chemistry", "physics", "biology", "trees",
    "flowers", "the seasons", "a birthday", "grandparents", "childhood", "school",
    "homework", "exams", "university", "a science fair", "volunteering", "charity", "democracy", "laws", "taxes",
    "banks", "a budget", "the stock market", "a small business", "advertising", "a job in a hospital", "firefighters",
    "farmers", "pilots", "teachers", "engineers", "nurses", "carpenters", "a lost key", "a late train", "patience",
    "kindness", "honesty", "courage", "curiosity", "boredom", "motivation", "habits", "goals for the new year",
]
"""Everyday subjects. None is one of the steering bench's concepts or lexicon words."""

REQUESTS = [
    "Tell me about {s}.", "What should I know about {s}?", "Explain {s} to a ten-year-old.", "Write a short story about {s}.",
    "Give me three tips about {s}.", "What are the pros and cons of {s}?", "Write a short poem about {s}.",
    "Why do people care about {s}?", "Describe {s} in a few sentences.", "What is a common mistake people make with {s}?",
    "Share an interesting fact about {s}.", "How would you explain {s} to someone from the past?",
    "Write a diary entry about {s}.", "What questions should I ask about {s}?", "Summarise what you know about {s}.",
    "Help me write a paragraph on {s}.", "What is your opinion on {s}?", "Compare {s} today with fifty years ago.",
    "Give me a step-by-step guide related to {s}.", "Write a dialogue between two friends about {s}.",
]

OPEN_REQUESTS = [
    "How are you today?", "Can you help me with something?", "What can you do?", "Tell me a joke.",
    "I feel tired, any advice?", "Give me a random idea.", "What is the meaning of a good life?", "Say something nice.",
    "What should I learn next?", "Write a motivational message.", "Suggest a name for my project.", "Tell me a riddle.",
    "What is something most people do not know?", "Describe yourself in three words.", "What is hard about being an assistant?",
    "Write a thank-you note.", "What makes a good teacher?", "Help me plan my week.", "Why is the sky blue?",
    "How do computers store numbers?", "What is the difference between weather and climate?", "Write a haiku.",
]


def requests(n: int, seed: int = 0) -> list[str]:
    """`n` distinct user requests, in a fixed order: the open requests, then request forms
    crossed with subjects, drawn without replacement by a seeded generator. None is a
    steering benchmark prompt."""
    from analysis.steering import MORE_NEUTRAL_PROMPTS, NEUTRAL_PROMPTS
    from analysis.steering.concept import MORE_TUNING_PROMPTS, TUNING_PROMPTS

    crossed = [form.format(s=subject) for form in REQUESTS for subject in SUBJECTS]
    random.Random(seed).shuffle(crossed)
    reserved = set(NEUTRAL_PROMPTS) | set(MORE_NEUTRAL_PROMPTS) | set(TUNING_PROMPTS) | set(MORE_TUNING_PROMPTS)
    pool = [r for r in OPEN_REQUESTS + crossed if r not in reserved]
    if n > len(pool):
        raise ValueError(f"only {len(pool)} distinct requests; asked for {n}")
    return pool[:n]


def _finished(partial: Path) -> list[dict]:
    """The conversations of whole lines in the partial file (a torn last line is dropped and rewritten)."""
    if not partial.exists():
        return []
    lines = partial.read_text(encoding="utf-8").splitlines(keepends=True)
    whole = [line for line in lines if line.endswith("\n")]
    if len(whole) < len(lines):
        partial.write_text("".join(whole), encoding="utf-8")
    return [json.loads(line) for line in whole]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048, help="conversations (requests answered)")
    parser.add_argument("--max-new-tokens", type=int, default=112, help="most tokens per answer")
    parser.add_argument("--batch-size", type=int, default=64, help="answers generated together")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request order and of the sampling")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "chat_corpus.jsonl.xz")
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    from activations import load_model
    from activations.generation import GenerationConfig, decode, encode_prompts, generate_tokens

    todo = requests(args.n, args.seed)
    partial = args.out.with_name(args.out.name + ".partial.jsonl")
    done = _finished(partial)
    model = load_model("smollm2", device="cpu", dtype=torch.bfloat16)
    tokenizer = model.tokenizer
    with partial.open("a", encoding="utf-8") as out, tqdm(total=len(todo), initial=len(done), desc="answers") as bar:
        for start in range(len(done), len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.8, seed=args.seed + start, chat=True,
                                   batch_size=args.batch_size)
            answers = generate_tokens(model, encode_prompts(tokenizer, batch, chat=True), cfg)
            lines = []
            for i, (request, answer) in enumerate(zip(batch, answers), start):
                conversation = [{"role": "user", "content": request}, {"role": "assistant", "content": decode(tokenizer, answer).strip()}]
                text = tokenizer.apply_chat_template(conversation, tokenize=False)
                lines.append(json.dumps({"id": f"chat/{i}", "text": text}, ensure_ascii=False) + "\n")
            out.write("".join(lines))  # one write per batch: a crash loses at most the batch being written
            out.flush()
            bar.update(len(batch))
    docs = _finished(partial)[: len(todo)]
    write_corpus(docs, args.out)
    partial.unlink()
    n_tokens = sum(len(tokenizer(d["text"], add_special_tokens=False)["input_ids"]) for d in docs)
    print(f"{len(docs)} conversations, {n_tokens / 1e3:.0f}k tokens -> {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
