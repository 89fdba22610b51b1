"""Build ``src/engramlab/data/bundled/smollm2_facts.json``: facts the embedded model knows.

Hand-written relation tables (subject, true object) are crossed with hand-written prompt
templates. A fact is kept when SmolLM2-135M's greedy next token after the main prompt is the
first token of " " + its true object. Paraphrases are kept when the model ranks the true object
above the counterfactual target (mean token log-prob, as the metric scores them). Every
third known subject of each object is held out of the cases and used only as a neighbourhood
prompt (another subject with the same true object), so a batch edit of all cases is never
judged on neighbours it edited itself. The subject's other known facts (other relations, kept
or reserved) are its relation prompts, with their true objects as answers: what the model says
there before any edit. CounterFact's nested format is written, with the counterfactual
``target_new`` drawn from the same relation's other objects.

    .venv/bin/python scripts/build_facts.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

import engramlab as eg
from engramlab.evaluate.scoring import score_targets

RELATIONS: dict[str, dict] = {
    "P36": {
        "prompt": "The capital of {} is",
        "paraphrases": ["The capital city of {} is", "{}'s capital is the city of",
                        "The seat of government of {} is in"],
        "generation": ["The capital of {} is famous for", "{} is a country whose capital"],
        "facts": [("France", "Paris"), ("Italy", "Rome"), ("England", "London"),
                  ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Russia", "Moscow"),
                  ("Spain", "Madrid"), ("Egypt", "Cairo"), ("China", "Beijing"),
                  ("Greece", "Athens"), ("Austria", "Vienna"), ("Portugal", "Lisbon"),
                  ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
                  ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Kenya", "Nairobi"),
                  ("Thailand", "Bangkok"), ("Canada", "Ottawa"), ("Denmark", "Copenhagen"),
                  ("Finland", "Helsinki"), ("Belgium", "Brussels"), ("Cuba", "Havana")],
    },
    "P131": {
        "prompt": "{} is located in the city of",
        "paraphrases": ["{} can be found in the city of", "The famous {} stands in",
                        "Tourists visit {} in the city of"],
        "generation": ["{} is a landmark that", "People who visit {} often"],
        "facts": [("The Eiffel Tower", "Paris"), ("The Louvre", "Paris"),
                  ("Notre-Dame Cathedral", "Paris"), ("The Colosseum", "Rome"),
                  ("The Pantheon", "Rome"), ("Big Ben", "London"),
                  ("Buckingham Palace", "London"), ("Tower Bridge", "London"),
                  ("The Brandenburg Gate", "Berlin"), ("The Kremlin", "Moscow"),
                  ("Red Square", "Moscow"), ("The Acropolis", "Athens"),
                  ("The Sagrada Familia", "Barcelona"), ("The Golden Gate Bridge", "San Francisco"),
                  ("The Statue of Liberty", "New York"), ("The Forbidden City", "Beijing"),
                  ("The Sydney Opera House", "Sydney"), ("The Space Needle", "Seattle"),
                  ("The Prado Museum", "Madrid"), ("The Vatican Museums", "Rome"),
                  ("The Arc de Triomphe", "Paris"), ("The Trevi Fountain", "Rome"),
                  ("Westminster Abbey", "London"), ("Trafalgar Square", "London"),
                  ("Checkpoint Charlie", "Berlin"), ("The Reichstag building", "Berlin"),
                  ("The Parthenon", "Athens"), ("Tiananmen Square", "Beijing"),
                  ("Tokyo Tower", "Tokyo"), ("Schönbrunn Palace", "Vienna"),
                  ("Dublin Castle", "Dublin"), ("The Royal Palace of Madrid", "Madrid"),
                  ("The Tivoli Gardens", "Copenhagen"), ("The Belém Tower", "Lisbon"),
                  ("The Empire State Building", "New York"), ("Central Park", "New York"),
                  ("Times Square", "New York"), ("Alcatraz Island", "San Francisco"),
                  ("The British Museum", "London"), ("Montmartre", "Paris"),
                  ("The Rijksmuseum", "Amsterdam"), ("Hagia Sophia", "Istanbul"),
                  ("The Blue Mosque", "Istanbul"), ("The Uffizi Gallery", "Florence"),
                  ("The Bolshoi Theatre", "Moscow"), ("The Tower of London", "London")],
    },
    "P37": {
        "prompt": "The official language of {} is",
        "paraphrases": ["In {}, most people speak", "The main language spoken in {} is",
                        "People in {} usually speak"],
        "generation": ["In {}, people speak", "The language of {} is"],
        "facts": [("France", "French"), ("Spain", "Spanish"), ("Mexico", "Spanish"),
                  ("Argentina", "Spanish"), ("Colombia", "Spanish"), ("Germany", "German"),
                  ("Austria", "German"), ("Japan", "Japanese"), ("Russia", "Russian"),
                  ("Italy", "Italian"), ("Portugal", "Portuguese"), ("Brazil", "Portuguese"),
                  ("China", "Chinese"), ("Greece", "Greek"), ("Poland", "Polish"),
                  ("Turkey", "Turkish"), ("Sweden", "Swedish"), ("Israel", "Hebrew"),
                  ("Iran", "Persian"), ("the Netherlands", "Dutch"), ("Finland", "Finnish"),
                  ("Chile", "Spanish"), ("Peru", "Spanish"), ("Cuba", "Spanish"),
                  ("Venezuela", "Spanish"), ("Egypt", "Arabic"), ("Saudi Arabia", "Arabic"),
                  ("Morocco", "Arabic"), ("Iraq", "Arabic"), ("South Korea", "Korean"),
                  ("Vietnam", "Vietnamese"), ("Thailand", "Thai"), ("Denmark", "Danish"),
                  ("Norway", "Norwegian"), ("Hungary", "Hungarian"), ("Ukraine", "Ukrainian"),
                  ("Angola", "Portuguese"), ("Mozambique", "Portuguese")],
    },
    "P30": {
        "prompt": "{} is located in the continent of",
        "paraphrases": ["{} is a country in", "{} is part of the continent of",
                        "The country of {} lies in"],
        "generation": ["{} is a country that", "The geography of {}"],
        "facts": [("Kenya", "Africa"), ("Nigeria", "Africa"), ("Egypt", "Africa"),
                  ("Ghana", "Africa"), ("Ethiopia", "Africa"), ("Morocco", "Africa"),
                  ("Japan", "Asia"), ("China", "Asia"), ("India", "Asia"),
                  ("Vietnam", "Asia"), ("Thailand", "Asia"), ("France", "Europe"),
                  ("Germany", "Europe"), ("Italy", "Europe"), ("Poland", "Europe"),
                  ("Brazil", "South America"), ("Argentina", "South America"),
                  ("Peru", "South America"), ("Chile", "South America"),
                  ("Canada", "North America"), ("Mexico", "North America"),
                  ("Colombia", "South America"), ("Venezuela", "South America"),
                  ("Cuba", "North America"), ("Guatemala", "North America"),
                  ("Spain", "Europe"), ("Sweden", "Europe"), ("Pakistan", "Asia"),
                  ("Indonesia", "Asia"), ("Tanzania", "Africa"), ("Uganda", "Africa")],
    },
    "P17": {
        "prompt": "{} is a city in the country of",
        "paraphrases": ["The city of {} is located in", "{} is one of the largest cities in",
                        "{} is a city located in"],
        "generation": ["The city of {} is known for", "Life in {} is"],
        "facts": [("Lyon", "France"), ("Marseille", "France"), ("Munich", "Germany"),
                  ("Hamburg", "Germany"), ("Milan", "Italy"), ("Naples", "Italy"),
                  ("Venice", "Italy"), ("Barcelona", "Spain"), ("Seville", "Spain"),
                  ("Osaka", "Japan"), ("Kyoto", "Japan"), ("Toronto", "Canada"),
                  ("Vancouver", "Canada"), ("Sydney", "Australia"), ("Melbourne", "Australia"),
                  ("Mumbai", "India"), ("Delhi", "India"), ("Shanghai", "China"),
                  ("Saint Petersburg", "Russia"), ("Istanbul", "Turkey"),
                  ("Rio de Janeiro", "Brazil"), ("Manchester", "England"),
                  ("Amsterdam", "Netherlands"),
                  ("Frankfurt", "Germany"), ("Cologne", "Germany"), ("Florence", "Italy"),
                  ("Turin", "Italy"), ("Valencia", "Spain"), ("Nice", "France"),
                  ("Bordeaux", "France"), ("Yokohama", "Japan"), ("Montreal", "Canada"),
                  ("Brisbane", "Australia"), ("Bangalore", "India"), ("Guangzhou", "China"),
                  ("Novosibirsk", "Russia"), ("Liverpool", "England"),
                  ("Lille", "France"), ("Toulouse", "France"), ("Strasbourg", "France"),
                  ("Stuttgart", "Germany"), ("Dresden", "Germany"), ("Leipzig", "Germany"),
                  ("Bologna", "Italy"), ("Genoa", "Italy"), ("Palermo", "Italy"),
                  ("Bilbao", "Spain"), ("Malaga", "Spain"), ("Zaragoza", "Spain"),
                  ("Nagoya", "Japan"), ("Sapporo", "Japan"), ("Hiroshima", "Japan"),
                  ("Calgary", "Canada"), ("Perth", "Australia"), ("Adelaide", "Australia"),
                  ("Chennai", "India"), ("Kolkata", "India"), ("Shenzhen", "China"),
                  ("Wuhan", "China"), ("Kazan", "Russia"), ("Vladivostok", "Russia"),
                  ("Ankara", "Turkey"), ("Izmir", "Turkey"), ("São Paulo", "Brazil"),
                  ("Salvador", "Brazil"), ("Birmingham", "England"), ("Leeds", "England"),
                  ("Rotterdam", "Netherlands"), ("Utrecht", "Netherlands"),
                  ("Krakow", "Poland"), ("Gdansk", "Poland"), ("Porto", "Portugal")],
    },
    "P103": {
        "prompt": "The mother tongue of {} is",
        "paraphrases": ["{} grew up speaking", "The first language of {} is",
                        "{} is a native speaker of"],
        "generation": ["{} is best known for", "{} spent most of their life"],
        "facts": [("Vladimir Putin", "Russian"), ("Emmanuel Macron", "French"),
                  ("Angela Merkel", "German"), ("Victor Hugo", "French"),
                  ("Leo Tolstoy", "Russian"), ("Johann Wolfgang von Goethe", "German"),
                  ("Dante Alighieri", "Italian"), ("Miguel de Cervantes", "Spanish"),
                  ("Pablo Picasso", "Spanish"), ("Silvio Berlusconi", "Italian"),
                  ("Fyodor Dostoevsky", "Russian"), ("Jacques Chirac", "French"),
                  ("Charles de Gaulle", "French"), ("Napoleon Bonaparte", "French"),
                  ("Vincent van Gogh", "Dutch"), ("Alexander Pushkin", "Russian"),
                  ("Franz Kafka", "German"), ("Friedrich Nietzsche", "German"),
                  ("Gabriel García Márquez", "Spanish"), ("Boris Yeltsin", "Russian"),
                  ("Nicolas Sarkozy", "French"), ("Mikhail Gorbachev", "Russian"),
                  ("Anton Chekhov", "Russian"), ("Helmut Kohl", "German"),
                  ("Thomas Mann", "German"), ("Giuseppe Verdi", "Italian"),
                  ("Umberto Eco", "Italian"), ("Federico Fellini", "Italian"),
                  ("Salvador Dalí", "Spanish"), ("Jorge Luis Borges", "Spanish"),
                  ("Rembrandt", "Dutch"), ("Akira Kurosawa", "Japanese"),
                  ("Haruki Murakami", "Japanese"), ("Ingmar Bergman", "Swedish"),
                  ("Albert Camus", "French"), ("Claude Monet", "French"),
                  ("Ludwig van Beethoven", "German"), ("Frédéric Chopin", "Polish")],
    },
}


def first_token(lm: eg.LM, word: str) -> int:
    return lm.encode(" " + word)[0]


def prefers(lm: eg.LM, prompts: list[str], good: str, bad: str) -> list[bool]:
    """Does ``good`` get a higher mean token log-prob than ``bad`` (CounterFact's rule)?"""
    if not prompts:
        return []
    n = len(prompts)
    scores = score_targets(lm, prompts + prompts, [good] * n + [bad] * n)
    return [scores[i].logprob > scores[n + i].logprob for i in range(n)]


def main() -> None:
    lm = eg.load_model("smollm2-135m")
    cands = []
    for rel, spec in RELATIONS.items():
        objects = sorted({o for _, o in spec["facts"]})
        for i, (subject, obj) in enumerate(spec["facts"]):
            others = [o for o in objects if o != obj]
            new = others[(i * 7) % len(others)]
            cands.append((rel, subject, obj, new))

    mains = [RELATIONS[r]["prompt"].replace("{}", s) for r, s, _, _ in cands]
    tops = []
    for s in range(0, len(mains), 32):
        tops += lm.next_token_logits(mains[s:s + 32]).argmax(-1).tolist()
    known = [c for c, t in zip(cands, tops, strict=True) if t == first_token(lm, c[2])]
    print(f"{len(known)} of {len(cands)} candidate facts answered correctly")

    # A batch edit of every case must not be judged on neighbours that are themselves edited:
    # every third known subject of an object (the 2nd, 5th, ...) is kept out of the cases and
    # serves only as a neighbourhood prompt for the others.
    groups: dict[str, list[tuple]] = defaultdict(list)
    for fact in known:
        groups[fact[2]].append(fact)
    reserved = {f for g in groups.values() if len(g) >= 2 for i, f in enumerate(g) if i % 3 == 1}
    # a subject edited under one relation is no neighbour under another (Germany's language
    # edit may move "Germany is located in"); neighbours are other subjects, as in CounterFact
    case_subjects = {f[1] for f in known if f not in reserved}
    neighbours: dict[str, list[str]] = defaultdict(list)
    for rel, subject, obj, _ in (f for f in known if f in reserved):  # a reproducible order
        if subject in case_subjects:
            continue
        neighbours[obj].append(RELATIONS[rel]["prompt"].replace("{}", subject))

    facts_of: dict[str, list[tuple]] = defaultdict(list)
    for fact in known:
        facts_of[fact[1]].append(fact)
    cases = []
    for n, (rel, subject, obj, new) in enumerate(known):
        if (rel, subject, obj, new) in reserved:
            continue
        spec = RELATIONS[rel]
        paras = [p.replace("{}", subject) for p in spec["paraphrases"]]
        paras = [p for p, ok in zip(paras, prefers(lm, paras, obj, new), strict=True) if ok]
        neigh = [p for p in neighbours[obj] if subject not in p][:4]
        neigh = [p for p, ok in zip(neigh, prefers(lm, neigh, obj, new), strict=True) if ok]
        main_ok = prefers(lm, [spec["prompt"].replace("{}", subject)], obj, new)[0]
        if not (main_ok and paras and neigh):
            continue
        cases.append({
            "case_id": n,
            "requested_rewrite": {"prompt": spec["prompt"], "subject": subject,
                                  "target_new": {"str": new}, "target_true": {"str": obj},
                                  "relation_id": rel},
            "paraphrase_prompts": paras,
            "neighborhood_prompts": neigh,
            "generation_prompts": [g.replace("{}", subject) for g in spec["generation"]],
            "relation_prompts": [
                {"prompt": RELATIONS[r]["prompt"].replace("{}", subject), "answer": " " + o}
                for r, _, o, _ in facts_of[subject] if r != rel],
        })
    edited = {c["requested_rewrite"]["subject"] for c in cases}
    assert not any(f" {s} " in f" {p} " for c in cases for p in c["neighborhood_prompts"]
                   for s in edited), "a neighbourhood prompt names an edited subject"
    out = Path(__file__).resolve().parents[1] / "src/engramlab/data/bundled/smollm2_facts.json"
    out.write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases ({len(reserved)} subjects kept as neighbours only) to {out}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
