"""Labelled query pairs for measuring a semantic response cache: recall on paraphrases and false
hits on near misses.

    python -m duetserve.loadtest.semantic_pairs --out docs/bench/semantic_pairs.json
    python -m duetserve.loadtest.semantic_pairs --check docs/bench/semantic_pairs.json

A semantic cache answers a new query with the stored answer of an earlier one that means the
same. Its worst failure is a false hit: serving the answer of a query that looks alike but needs
another answer. So the dataset has two labels. A `paraphrase` pair is one intent with the same
slot values written two different ways: one correct answer serves both. A `near_miss` pair keeps
the look of the query but changes what it asks, by one of five kinds of edit:

- `number`: one number changed (5% vs 7%, 10 years vs 15 years, first 10 vs first 20 rows);
- `entity`: a named thing changed (Paris vs Lyon, AAPL vs MSFT, Python vs Rust);
- `negation`: the meaning inverted (with vs without, keep vs discard, have vs do not have);
- `scope`: a qualifier, unit or range changed (monthly vs yearly, today vs tomorrow, first vs
  last, largest vs smallest, before vs after);
- `code_variant`: the same task on another structure, API or operation (sort by value vs by
  key, read vs write a file, inner vs left join).

Every query comes from a hand-written intent: four to six templates that ask the same thing in
different words, slots whose values fill them (each slot tagged with the kind of near miss that
changing it makes), and "twins": parallel templates that ask something else (a negation, another
scope, a variant of the code). Half of the near misses keep the template (the easy case: one
word differs); the other half also paraphrase (the hard case: the wording differs too).

Intents are split whole into `tune` (about 40%) and `test` (the rest) by the sha256 of their
id, so a threshold tuned on `tune` is measured on intents it never saw. The pairs are drawn with
a fixed seed, and the file is frozen before any embedding model or threshold is tried: tuning
must not shape the data it is judged on. `--check` proves a file is this generator's output.
"""

import argparse
import hashlib
import json
import random
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SEED = 0
PER_LABEL = 220  # pairs of each label in each category
TUNE_SHARE = 0.4  # of each category's intents
CATEGORIES = ("code", "chat", "factual", "finance", "volatile")
LABELS = ("paraphrase", "near_miss")
KINDS = ("number", "entity", "negation", "scope", "code_variant")
# The near-miss kinds each category must have: those its false hits most likely come from.
REQUIRED_KINDS = {
    "code": ("code_variant",),
    "chat": (),
    "factual": ("number", "entity"),
    "finance": ("number", "entity"),
    "volatile": ("entity", "scope"),
}
MIN_KINDS = 3  # distinct near-miss kinds per category
_ATTEMPTS = 40  # random draws per try before a source counts as used up


@dataclass(frozen=True, slots=True)
class Slot:
    """A blank in every template of an intent. Changing its value makes a near miss of `kind`
    (None: the slot only varies the queries and is never contrasted)."""

    kind: str | None
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Twin:
    """Templates parallel to an intent's (same order, same slots) that ask something else, so
    that twin n against template n differs by the contrast alone."""

    kind: str
    templates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Intent:
    category: str
    name: str
    templates: tuple[str, ...]
    slots: dict[str, Slot] = field(default_factory=dict)
    twins: tuple[Twin, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


@dataclass(frozen=True, slots=True)
class Pair:
    id: str
    category: str
    intent: str
    split: str
    label: str
    kind: str
    a: str
    b: str


def slot(kind: str | None, values: str) -> Slot:
    """A slot from its values written as one string, "a | b | c", to keep the tables short."""
    return Slot(kind, tuple(v.strip() for v in values.split("|")))


def twin(kind: str, *templates: str) -> Twin:
    return Twin(kind, templates)


def intent(
    id_: str,
    templates: tuple[str, ...],
    slots: dict[str, Slot] | None = None,
    *twins: Twin,
) -> Intent:
    """An intent from its id, "category/name"."""
    category, name = id_.split("/")
    return Intent(category, name, templates, slots or {}, twins)


# Slot pools shared by several intents.
_CITIES = "Paris | London | Tokyo | Chicago | Sydney | Berlin | Toronto | Madrid"
_TICKERS = "AAPL | MSFT | TSLA | NVDA | AMZN | GOOGL"

CODE = (
    intent(
        "code/reverse-list",
        (
            "how do i reverse a list in {lang}",
            "What's the idiomatic way to reverse a list in {lang}?",
            "{lang}: reverse list",
            "Could you show me how to invert the order of the elements of a list in {lang}?",
            "need a {lang} snippet that reverses a list",
        ),
        {"lang": slot("entity", "Python | JavaScript | Java | Go | Rust | C# | Ruby")},
        twin(
            "code_variant",
            "how do i reverse a string in {lang}",
            "What's the idiomatic way to reverse a string in {lang}?",
            "{lang}: reverse string",
            "Could you show me how to invert the order of the characters of a string in {lang}?",
            "need a {lang} snippet that reverses a string",
        ),
    ),
    intent(
        "code/pandas-head-rows",
        (
            "how to read only the first {n} rows of a csv with pandas",
            "pandas read_csv first {n} rows only",
            "Is there a way to load just the first {n} rows of a CSV file into a pandas DataFrame?",
            "In pandas, how can I read the top {n} rows of a csv file without loading all of it?",
            "load first {n} rows of csv pandas",
        ),
        {"n": slot("number", "5 | 10 | 50 | 100 | 1000")},
        twin(
            "scope",
            "how to read only the last {n} rows of a csv with pandas",
            "pandas read_csv last {n} rows only",
            "Is there a way to load just the last {n} rows of a CSV file into a pandas DataFrame?",
            "In pandas, how can I read the bottom {n} "
            "rows of a csv file without loading all of it?",
            "load last {n} rows of csv pandas",
        ),
    ),
    intent(
        "code/dataframe-export",
        (
            "how do I save a pandas dataframe to {fmt} without the index",
            "pandas: export df to {fmt}, no index column",
            "Write a DataFrame out as {fmt} but leave out the index. How?",
            "What's the pandas call to dump a dataframe in {fmt} format without writing the index?",
            "save dataframe as {fmt} without index pandas",
        ),
        {"fmt": slot("code_variant", "CSV | Excel | Parquet | JSON")},
        twin(
            "negation",
            "how do I save a pandas dataframe to {fmt} with the index",
            "pandas: export df to {fmt}, keep the index column",
            "Write a DataFrame out as {fmt} but keep the index. How?",
            "What's the pandas call to dump a dataframe in {fmt} format including the index?",
            "save dataframe as {fmt} with index pandas",
        ),
    ),
    intent(
        "code/sql-join",
        (
            "SQL {join} between customers and orders, how?",
            "write a query joining customers and orders using {join}",
            "Can you give me an example of {join} on a customers table and an orders table?",
            "customers + orders sql {join} example",
            "How would I use {join} in SQL to match customers with their orders?",
        ),
        {"join": slot("code_variant", "INNER JOIN | LEFT JOIN | RIGHT JOIN | FULL OUTER JOIN")},
    ),
    intent(
        "code/regex-email",
        (
            "regex to validate an email address in {lang}",
            "How can I check if a string is a valid email with a regular expression in {lang}?",
            "{lang} email validation regex",
            "what regular expression should I use in {lang} to check email addresses",
            "Give me a {lang} regex that validates emails.",
        ),
        {"lang": slot("entity", "Python | JavaScript | Java | PHP | Go")},
        twin(
            "code_variant",
            "regex to extract all email addresses from a text in {lang}",
            "How can I find every email in a string with a regular expression in {lang}?",
            "{lang} extract emails regex",
            "what regular expression should I use in "
            "{lang} to pull all email addresses out of text",
            "Give me a {lang} regex that extracts every email.",
        ),
    ),
    intent(
        "code/git-undo-commits",
        (
            "git undo last {n} commits but keep my changes",
            "How do I undo the last {n} commits in git without losing the changes in my files?",
            "Is there a way to roll back my last {n} git commits while keeping the edits?",
            "git: remove last {n} commits, keep the modified files",
            "how to uncommit the last {n} commits in git and keep the code changes",
        ),
        {"n": slot("number", "2 | 3 | 4 | 5")},
        twin(
            "negation",
            "git undo last {n} commits and throw away my changes",
            "How do I undo the last {n} commits in git and also lose the changes in my files?",
            "Is there a way to roll back my last {n} git commits and discard the edits?",
            "git: remove last {n} commits, discard the modified files",
            "how to uncommit the last {n} commits in git and delete the code changes",
        ),
    ),
    intent(
        "code/git-delete-branch",
        (
            "how do I delete a local git branch",
            "git delete branch locally",
            "What's the command to remove a branch from my local repository in git?",
            "delete a git branch on my machine only, how",
            "How can I get rid of a local branch in Git?",
        ),
        None,
        twin(
            "scope",
            "how do I delete a remote git branch",
            "git delete branch remotely",
            "What's the command to remove a branch from the remote repository in git?",
            "delete a git branch on the remote (origin), how",
            "How can I get rid of a remote branch in Git?",
        ),
    ),
    intent(
        "code/binary-search",
        (
            "implement binary search in {lang} with a loop",
            "Can you write an iterative binary search function in {lang}?",
            "{lang} binary search on a sorted array, iterative version please",
            "how would you code binary search in {lang} using a while loop",
            "I need a non-recursive {lang} implementation of binary search.",
        ),
        {"lang": slot("entity", "C++ | Java | Python | Go | C")},
        twin(
            "code_variant",
            "implement binary search in {lang} with recursion",
            "Can you write a recursive binary search function in {lang}?",
            "{lang} binary search on a sorted array, recursive version please",
            "how would you code binary search in {lang} using recursion",
            "I need a recursive {lang} implementation of binary search.",
        ),
    ),
    intent(
        "code/sort-dict-by-value",
        (
            "sort a python dict by value in {order} order",
            "How can I sort a dictionary by its values, {order}, in Python?",
            "python: order dict items by value ({order})",
            "What's the cleanest way to get a Python dictionary sorted by value in {order} order?",
            "sort dictionary by values {order} python",
        ),
        {"order": slot("scope", "ascending | descending")},
        twin(
            "code_variant",
            "sort a python dict by key in {order} order",
            "How can I sort a dictionary by its keys, {order}, in Python?",
            "python: order dict items by key ({order})",
            "What's the cleanest way to get a Python dictionary sorted by key in {order} order?",
            "sort dictionary by keys {order} python",
        ),
    ),
    intent(
        "code/remove-duplicates",
        (
            "remove duplicates from a list in {lang}",
            "How do I deduplicate a list in {lang}?",
            "{lang} get the unique elements of a list",
            "what's the best way in {lang} to drop duplicate items from a list",
            "Removing duplicate values from a {lang} list, how?",
        ),
        {"lang": slot("entity", "Python | JavaScript | Java | C# | Kotlin")},
        twin(
            "code_variant",
            "find duplicates in a list in {lang}",
            "How do I list the duplicated items of a list in {lang}?",
            "{lang} get the repeated elements of a list",
            "what's the best way in {lang} to find duplicate items in a list",
            "Finding duplicate values in a {lang} list, how?",
        ),
    ),
    intent(
        "code/http-get-params",
        (
            "how to send a GET request with query parameters using {lib} in python",
            "{lib} GET request with params example",
            "Python: making an HTTP GET call with URL parameters via {lib}",
            "Can you show me how to pass query params in a GET request with {lib}?",
            "python {lib} get with query string parameters",
        ),
        {"lib": slot("code_variant", "requests | httpx | urllib | aiohttp")},
        twin(
            "code_variant",
            "how to send a POST request with a JSON body using {lib} in python",
            "{lib} POST request with json example",
            "Python: making an HTTP POST call with a JSON payload via {lib}",
            "Can you show me how to send a JSON body in a POST request with {lib}?",
            "python {lib} post with json body",
        ),
    ),
    intent(
        "code/fibonacci",
        (
            "print the first {n} fibonacci numbers in {lang}",
            "Write a {lang} program that outputs the first {n} numbers of the Fibonacci sequence.",
            "{lang} code for first {n} fibonacci numbers",
            "How do I generate the first {n} Fibonacci numbers using {lang}?",
            "fibonacci sequence first {n} terms {lang}",
        ),
        {
            "n": slot("number", "10 | 15 | 20 | 50"),
            "lang": slot("entity", "Python | Java | C | JavaScript"),
        },
    ),
    intent(
        "code/comprehension-parity",
        (
            "python list comprehension to keep only the {parity} numbers",
            "How can I filter a list down to {parity} numbers with a list comprehension in Python?",
            "list comprehension {parity} numbers only python",
            "In Python, write a one-liner that returns just the {parity} values of a list of ints.",
            "keep just the {parity} numbers of a list using a comprehension (python)",
        ),
        {"parity": slot("scope", "even | odd")},
        twin(
            "negation",
            "python list comprehension to drop the {parity} numbers",
            "How can I filter the {parity} numbers out of a list with a comprehension in Python?",
            "list comprehension excluding {parity} numbers python",
            "In Python, write a one-liner that returns everything except the {parity} values of a "
            "list of ints.",
            "remove the {parity} numbers of a list using a comprehension (python)",
        ),
    ),
    intent(
        "code/docker-prune-containers",
        (
            "how to remove all stopped docker containers",
            "docker command to delete every stopped container",
            "Is there a single command to clean up all my stopped Docker containers?",
            "docker: prune stopped containers",
            "What's the best way to get rid of all exited containers in docker?",
        ),
        None,
        twin(
            "code_variant",
            "how to remove all unused docker images",
            "docker command to delete every unused image",
            "Is there a single command to clean up all my unused Docker images?",
            "docker: prune unused images",
            "What's the best way to get rid of all unused images in docker?",
        ),
    ),
    intent(
        "code/await-all-promises",
        (
            "how to wait for all promises to resolve in javascript",
            "JS: run several promises and wait until every one is done",
            "What's the way to await multiple promises and continue when all of them finish?",
            "javascript wait for all promises",
            "In JavaScript, how can I wait until a whole array of promises has resolved?",
        ),
        None,
        twin(
            "scope",
            "how to wait for the first promise to resolve in javascript",
            "JS: run several promises and wait until the first one is done",
            "What's the way to await multiple promises "
            "and continue when the first of them finishes?",
            "javascript wait for first promise",
            "In JavaScript, how can I wait until the first of an array of promises has resolved?",
        ),
    ),
    intent(
        "code/string-to-int",
        (
            "convert a string to an integer in {lang}",
            "How do I parse a string into an int in {lang}?",
            "{lang} string to int",
            "What's the right way to turn a numeric string into an integer in {lang}?",
            "parse int from string {lang}",
        ),
        {"lang": slot("entity", "Java | C | Go | Rust | Python | C++")},
        twin(
            "code_variant",
            "convert an integer to a string in {lang}",
            "How do I format an int as a string in {lang}?",
            "{lang} int to string",
            "What's the right way to turn an integer into a string in {lang}?",
            "make string from int {lang}",
        ),
    ),
    intent(
        "code/read-file-lines",
        (
            "read a text file line by line in {lang}",
            "How can I iterate over the lines of a file in {lang}?",
            "{lang} read file line by line",
            "What's the usual way to process a text file one line at a time in {lang}?",
            "I want to loop through each line of a txt file using {lang}. How?",
        ),
        {"lang": slot("entity", "Python | Java | Go | Rust | C#")},
        twin(
            "code_variant",
            "write lines to a text file in {lang}",
            "How can I write a list of lines to a file in {lang}?",
            "{lang} write file line by line",
            "What's the usual way to write a text file one line at a time in {lang}?",
            "I want to write each string as a line of a txt file using {lang}. How?",
        ),
    ),
    intent(
        "code/format-date",
        (
            "format a date as {fmt} in {lang}",
            "How do I print a date in {fmt} format using {lang}?",
            "{lang} date to string {fmt}",
            "What's the {lang} code to display a date in the {fmt} format?",
            "convert a datetime to a {fmt} string in {lang}",
        ),
        {
            "fmt": slot("scope", "YYYY-MM-DD | DD/MM/YYYY | MM/DD/YYYY"),
            "lang": slot("entity", "Python | JavaScript | Java | PHP"),
        },
    ),
    intent(
        "code/venv-activate",
        (
            "how to activate a python virtual environment on {os}",
            "{os}: activate venv python",
            "What command activates a Python venv on {os}?",
            "I made a virtualenv, how do I activate it on {os}?",
            "activating a python virtualenv in the {os} terminal",
        ),
        {"os": slot("entity", "Windows | Linux")},
        twin(
            "code_variant",
            "how to create a python virtual environment on {os}",
            "{os}: create venv python",
            "What command creates a Python venv on {os}?",
            "I need a virtualenv, how do I create it on {os}?",
            "creating a python virtualenv in the {os} terminal",
        ),
    ),
    intent(
        "code/find-large-files",
        (
            "find all files larger than {n}MB in linux",
            "linux command to list files bigger than {n} MB",
            "How do I search a directory tree for files over {n} megabytes on Linux?",
            "bash: find files > {n}MB",
            "Which find command shows files whose size exceeds {n} MB?",
        ),
        {"n": slot("number", "10 | 50 | 100 | 500 | 1000")},
        twin(
            "scope",
            "find all files smaller than {n}MB in linux",
            "linux command to list files smaller than {n} MB",
            "How do I search a directory tree for files under {n} megabytes on Linux?",
            "bash: find files < {n}MB",
            "Which find command shows files whose size is below {n} MB?",
        ),
    ),
    intent(
        "code/pandas-groupby",
        (
            "pandas group by one column and take the {agg} of another",
            "How do I compute the {agg} per group in a pandas DataFrame?",
            "groupby {agg} pandas example",
            "In pandas, how can I get the {agg} of column B for each value of column A?",
            "pandas: {agg} of a column grouped by another column",
        ),
        {"agg": slot("code_variant", "mean | sum | count | maximum | median")},
    ),
    intent(
        "code/cpp-sort-vector",
        (
            "c++ sort a vector in {order} order",
            "How do I sort a std::vector<int> {order} in C++?",
            "What's the C++ STL way to sort a vector of ints in {order} order?",
            "sort vector {order} c++",
            "In modern C++, how can I put a vector of integers into {order} order?",
        ),
        {"order": slot("scope", "ascending | descending")},
        twin(
            "code_variant",
            "c++ sort a std::list in {order} order",
            "How do I sort a std::list<int> {order} in C++?",
            "What's the C++ STL way to sort a std::list of ints in {order} order?",
            "sort std::list {order} c++",
            "In modern C++, how can I put a std::list of integers into {order} order?",
        ),
    ),
    intent(
        "code/json-parse",
        (
            "parse a JSON string in {lang}",
            "How do I turn a JSON string into an object in {lang}?",
            "{lang} json string to object",
            "What's the standard way to deserialize JSON text in {lang}?",
            "how to load json from a string with {lang}",
        ),
        {"lang": slot("entity", "Python | JavaScript | Go | Java | C#")},
        twin(
            "code_variant",
            "serialize an object to a JSON string in {lang}",
            "How do I turn an object into a JSON string in {lang}?",
            "{lang} object to json string",
            "What's the standard way to serialize data to JSON text in {lang}?",
            "how to dump an object to json with {lang}",
        ),
    ),
    intent(
        "code/css-center",
        (
            "how to center a div {axis} using {method}",
            "CSS {method}: center an element {axis}",
            "What's the {method} way to center a div {axis}?",
            "center div {axis} with {method}",
            "Can someone explain how I center a box {axis} in CSS with {method}?",
        ),
        {
            "axis": slot("scope", "horizontally | vertically"),
            "method": slot("code_variant", "flexbox | grid"),
        },
    ),
    intent(
        "code/catch-multiple-exceptions",
        (
            "catch multiple exceptions in one block in {lang}",
            "How can I handle several exception types with a single catch in {lang}?",
            "{lang}: one handler for multiple exceptions",
            "Is it possible in {lang} to catch two different exceptions in the same block?",
            "{lang} catch more than one exception type at once",
        ),
        {"lang": slot("entity", "Python | Java | C# | C++")},
    ),
    intent(
        "code/kubectl-log-lines",
        (
            "kubectl show the last {n} lines of a pod's logs",
            "How do I view only the last {n} log lines of a Kubernetes pod?",
            "k8s pod logs tail {n} lines",
            "what's the kubectl command to print the final {n} lines from a pod log",
            "Get just the most recent {n} lines of logs for a pod in kubernetes.",
        ),
        {"n": slot("number", "20 | 50 | 100 | 500")},
        twin(
            "scope",
            "kubectl show the first {n} lines of a pod's logs",
            "How do I view only the first {n} log lines of a Kubernetes pod?",
            "k8s pod logs head {n} lines",
            "what's the kubectl command to print the first {n} lines from a pod log",
            "Get just the oldest {n} lines of logs for a pod in kubernetes.",
        ),
    ),
    intent(
        "code/merge-dicts",
        (
            "merge two dictionaries in python",
            "How do I combine two dicts into one in Python?",
            "python merge dicts",
            "What is the most pythonic way to join two dictionaries together?",
            "python 3: combine 2 dictionaries",
        ),
        None,
        twin(
            "code_variant",
            "merge two lists in python",
            "How do I combine two lists into one in Python?",
            "python merge lists",
            "What is the most pythonic way to join two lists together?",
            "python 3: combine 2 lists",
        ),
    ),
    intent(
        "code/sql-limit-rows",
        (
            "how to select only the first {n} rows in {db}",
            "{db}: limit a query to {n} rows",
            "What's the syntax in {db} to return just {n} rows from a SELECT?",
            "{db} select top {n} rows",
            "Can you show me how to fetch the first {n} records of a query in {db}?",
        ),
        {
            "n": slot("number", "5 | 10 | 100"),
            "db": slot("entity", "PostgreSQL | SQL Server | Oracle"),
        },
    ),
    intent(
        "code/grep-lines",
        (
            "grep all lines that contain 'error' in a log file",
            "How do I print only the lines with the word error from a file using grep?",
            "grep lines matching error",
            "linux: show lines of app.log that include 'error'",
            "Which grep command lists every line containing error?",
        ),
        None,
        twin(
            "negation",
            "grep all lines that do not contain 'error' in a log file",
            "How do I print only the lines without the word error from a file using grep?",
            "grep lines not matching error",
            "linux: show lines of app.log that don't include 'error'",
            "Which grep command lists every line not containing error?",
        ),
    ),
)

CHAT = (
    intent(
        "chat/greeting",
        (
            "hi, how are you?",
            "Hello! How are you doing?",
            "hey how r u",
            "Good day to you, how are you?",
            "hiya, how's it going?",
        ),
    ),
    intent(
        "chat/write-poem",
        (
            "write a {n}-line poem about {topic}",
            "Could you compose a short poem about {topic}, {n} lines long?",
            "poem about {topic}, {n} lines",
            "I'd love a {n} line poem on the subject of {topic}.",
            "Can you write me a poem of {n} lines about {topic}?",
        ),
        {
            "n": slot("number", "4 | 6 | 10 | 12"),
            "topic": slot(
                "entity", "the sea | autumn | my cat | the moon | coffee | a rainy Monday"
            ),
        },
    ),
    intent(
        "chat/book-like",
        (
            "recommend me a book like {book}",
            "Can you suggest some books similar to {book}?",
            "I loved {book}, what should I read next?",
            "books like {book}?",
            "What would you recommend to someone who enjoyed {book}?",
        ),
        {"book": slot("entity", "Dune | Pride and Prejudice | The Hobbit | Gone Girl | Sapiens")},
        twin(
            "negation",
            "recommend me a book that is nothing like {book}",
            "Can you suggest some books completely different from {book}?",
            "I disliked {book}, what should I read next?",
            "books unlike {book}?",
            "What would you recommend to someone who did not enjoy {book}?",
        ),
    ),
    intent(
        "chat/gift-ideas",
        (
            "gift ideas for {person} under ${budget}",
            "What can I buy {person} for less than {budget} dollars?",
            "Need a present for {person} under ${budget}, any ideas?",
            "Suggest a few gifts for {person} that cost under ${budget}.",
            "what's a good gift for {person} if I can spend at most ${budget}",
        ),
        {
            "person": slot("entity", "my dad | my sister | a coworker | my boss"),
            "budget": slot("number", "20 | 50 | 100"),
        },
    ),
    intent(
        "chat/fall-asleep",
        (
            "how can i fall asleep faster",
            "Any tips for falling asleep more quickly at night?",
            "I lie awake for ages before I fall asleep. How do I fix that?",
            "tips to fall asleep fast",
            "What helps you drift off to sleep sooner?",
        ),
    ),
    intent(
        "chat/stay-motivated",
        (
            "how do I stay motivated when {activity}",
            "Any tips for keeping my motivation up while {activity}?",
            "struggling to stay motivated {activity}, help",
            "What can I do to remain motivated when I'm {activity}?",
            "staying motivated while {activity} - advice?",
        ),
        {
            "activity": slot(
                "entity",
                "studying for exams | working from home | "
                "learning to code | training for a marathon | job hunting",
            )
        },
    ),
    intent(
        "chat/explain-simply",
        (
            "explain {topic} like I'm five",
            "Can you explain {topic} to me in really simple terms, as if I were a small child?",
            "ELI5 {topic}",
            "How would you describe {topic} to a five-year-old?",
            "{topic} explained simply for a kid please",
        ),
        {
            "topic": slot(
                "entity", "black holes | inflation | the internet | photosynthesis | vaccines"
            )
        },
        twin(
            "scope",
            "explain {topic} like I'm a PhD student",
            "Can you explain {topic} to me in full technical depth, as if I were an expert?",
            "Explain {topic} at a graduate level",
            "How would you describe {topic} to a university professor?",
            "{topic} explained in technical detail for an expert please",
        ),
    ),
    intent(
        "chat/tell-joke",
        (
            "tell me a joke about {topic}",
            "Do you know any good jokes about {topic}?",
            "joke about {topic} pls",
            "Make me laugh with a joke about {topic}.",
            "I need a funny joke on the topic of {topic}",
        ),
        {"topic": slot("entity", "cats | programmers | dentists | penguins | mathematicians")},
    ),
    intent(
        "chat/get-over-breakup",
        (
            "how do i get over a breakup",
            "What's the best way to move on after a relationship ends?",
            "breakup recovery tips",
            "My partner and I just split up, how do I cope?",
            "Any advice for getting over an ex?",
        ),
        None,
        twin(
            "scope",
            "how do i break up with someone",
            "What's the best way to end a relationship?",
            "breakup conversation tips",
            "I want to split up with my partner, how do I tell them?",
            "Any advice for breaking up with someone kindly?",
        ),
    ),
    intent(
        "chat/pet-names",
        (
            "suggest {n} names for {pet}",
            "Can you give me {n} name ideas for {pet}?",
            "{n} good names for {pet}?",
            "I'm getting {pet}. What are {n} cute names I could use?",
            "list {n} possible names for {pet}",
        ),
        {
            "n": slot("number", "5 | 10 | 20"),
            "pet": slot("entity", "a black cat | a golden retriever | a pet rabbit | a parrot"),
        },
    ),
    intent(
        "chat/birthday-message",
        (
            "write a {tone} birthday message for {person}",
            "Can you help me write a {tone} happy birthday note to {person}?",
            "{tone} birthday wishes for {person}",
            "I need a {tone} message to wish {person} a happy birthday.",
            "what's a {tone} thing to write in a birthday card for {person}",
        ),
        {
            "tone": slot("scope", "funny | heartfelt | formal"),
            "person": slot("entity", "my mom | my best friend | a coworker | my grandfather"),
        },
    ),
    intent(
        "chat/say-phrase",
        (
            "how do you say '{phrase}' in {lang}",
            "Translate '{phrase}' into {lang}, please.",
            "'{phrase}' in {lang}?",
            "What's the {lang} for '{phrase}'?",
            "Can you tell me how to say '{phrase}' in {lang}?",
        ),
        {
            "phrase": slot(
                "entity",
                "thank you very much | where is the train station | good luck | nice to meet you",
            ),
            "lang": slot("entity", "French | Spanish | Japanese | German"),
        },
    ),
    intent(
        "chat/workout-plan",
        (
            "make me a {days}-day-a-week workout plan to {goal}, no equipment",
            "Can you design a home workout routine without equipment, {days} days per week, to "
            "help me {goal}?",
            "bodyweight only workout plan, {days} days/week, goal: {goal}",
            "I want to {goal}. What's a good {days} days a week plan with no equipment at all?",
            "{days} day per week equipment-free training plan to {goal}",
        ),
        {
            "days": slot("number", "3 | 4 | 5"),
            "goal": slot("scope", "build muscle | lose weight"),
        },
        twin(
            "negation",
            "make me a {days}-day-a-week workout plan to {goal}, full gym equipment",
            "Can you design a gym workout routine with equipment, {days} days per week, to help "
            "me {goal}?",
            "gym machines and weights workout plan, {days} days/week, goal: {goal}",
            "I want to {goal}. What's a good {days} days a week plan using gym equipment?",
            "{days} day per week gym-equipment training plan to {goal}",
        ),
    ),
    intent(
        "chat/meatless-recipe",
        (
            "give me a recipe for {dish} without meat",
            "How do I make vegetarian {dish}?",
            "{dish} recipe, no meat",
            "Could you share a meat-free {dish} recipe?",
            "what's a good way to cook {dish} without any meat",
        ),
        {"dish": slot("entity", "chili | lasagna | burritos | shepherd's pie | stuffed peppers")},
        twin(
            "negation",
            "give me a recipe for {dish} with meat",
            "How do I make {dish} with meat in it?",
            "{dish} recipe, with meat",
            "Could you share a {dish} recipe that includes meat?",
            "what's a good way to cook {dish} with plenty of meat",
        ),
    ),
    intent(
        "chat/interview-prep",
        (
            "how to prepare for a {role} job interview",
            "Any tips for my upcoming interview for a {role} position?",
            "{role} interview prep advice",
            "I have an interview for a {role} job next week. How should I get ready?",
            "What should I do to prepare for an interview as a {role}?",
        ),
        {
            "role": slot(
                "entity", "software engineer | nurse | teacher | project manager | data analyst"
            )
        },
    ),
    intent(
        "chat/movie-by-decade",
        (
            "recommend a good {genre} movie from the {decade}",
            "What's a {genre} film from the {decade} worth watching?",
            "{decade} {genre} movie recommendations",
            "Can you suggest some great {genre} movies made in the {decade}?",
            "looking for a {genre} movie from the {decade}, any ideas",
        ),
        {
            "genre": slot("entity", "horror | comedy | sci-fi | romance"),
            "decade": slot("scope", "1980s | 1990s | 2000s"),
        },
    ),
    intent(
        "chat/apology",
        (
            "help me write an apology to {person} for {reason}",
            "What should I say to apologize to {person} for {reason}?",
            "apology text to {person} for {reason}",
            "Can you draft a sincere sorry message to {person} about {reason}?",
            "I need to say sorry to {person} for {reason}. What do I write?",
        ),
        {
            "person": slot("entity", "my best friend | my manager | my sister"),
            "reason": slot("entity", "missing their birthday | being late | forgetting our plans"),
        },
    ),
    intent(
        "chat/learn-language",
        (
            "how can i learn {lang} in {n} months",
            "Is it possible to get conversational in {lang} within {n} months, and how?",
            "{n} month plan to learn {lang}",
            "What's the fastest way to learn {lang} if I have {n} months?",
            "I want to learn {lang} in {n} months. Where do I start?",
        ),
        {
            "lang": slot("entity", "Spanish | Japanese | German | Korean"),
            "n": slot("number", "3 | 6 | 12"),
        },
    ),
    intent(
        "chat/cheer-up",
        (
            "i'm feeling {feeling}, can you cheer me up",
            "I feel {feeling}, can you help me feel better?",
            "feeling {feeling} right now, say something nice",
            "Can you help me? I'm so {feeling} at the moment.",
            "I'm really {feeling} and need some encouragement.",
        ),
        {"feeling": slot("entity", "sad | stressed | lonely | anxious | unmotivated")},
    ),
    intent(
        "chat/your-favorite",
        (
            "what's your favorite {thing}?",
            "Do you have a favorite {thing}?",
            "fav {thing}?",
            "If you had to pick one {thing} as your favorite, what would it be?",
            "Tell me your all-time favorite {thing}.",
        ),
        {"thing": slot("entity", "movie | book | food | color | song")},
    ),
    intent(
        "chat/wedding-toast",
        (
            "write a {n}-minute wedding toast for my {rel}",
            "Can you help me write a wedding speech for my {rel} that lasts about {n} minutes?",
            "{n} min wedding toast, my {rel} is getting married",
            "My {rel} is getting married and I need a toast of roughly {n} minutes.",
            "wedding toast for my {rel}, around {n} minutes long",
        ),
        {
            "n": slot("number", "2 | 3 | 5"),
            "rel": slot("entity", "brother | sister | best friend | cousin"),
        },
    ),
    intent(
        "chat/indoor-date",
        (
            "fun indoor date ideas under ${budget}",
            "What are some indoor things to do on a date for less than {budget} dollars?",
            "cheap indoor date ideas, max ${budget}",
            "Can you suggest an at-home or indoor date that costs under ${budget}?",
            "indoor date night ideas on a ${budget} budget",
        ),
        {"budget": slot("number", "20 | 50 | 100")},
        twin(
            "scope",
            "fun outdoor date ideas under ${budget}",
            "What are some outdoor things to do on a date for less than {budget} dollars?",
            "cheap outdoor date ideas, max ${budget}",
            "Can you suggest an open-air or outdoor date that costs under ${budget}?",
            "outdoor date night ideas on a ${budget} budget",
        ),
    ),
    intent(
        "chat/procrastination",
        (
            "how do i stop procrastinating",
            "Any tips to beat procrastination?",
            "I keep putting things off. How do I stop?",
            "ways to stop procrastinating",
            "What actually works to stop procrastination?",
        ),
    ),
    intent(
        "chat/short-story",
        (
            "write a short story about {topic} for {aud}",
            "Can you tell me a short story about {topic}, suitable for {aud}?",
            "short story, {topic}, audience: {aud}",
            "I'd like a brief story featuring {topic} aimed at {aud}.",
            "make up a little story about {topic} for {aud}",
        ),
        {
            "topic": slot(
                "entity",
                "a lonely robot | a brave mouse | a dragon who can't fly | a lighthouse keeper",
            ),
            "aud": slot("scope", "young children | teenagers | adults"),
        },
    ),
    intent(
        "chat/conversation-starters",
        (
            "good conversation starters for {setting}",
            "What can I talk about at {setting}?",
            "icebreakers for {setting}?",
            "Give me some ways to start a conversation at {setting}.",
            "I'm nervous about {setting}, what are some topics to bring up?",
        ),
        {
            "setting": slot(
                "entity", "a first date | a networking event | a family dinner | a job fair"
            )
        },
    ),
    intent(
        "chat/decline-politely",
        (
            "how do I politely decline {event}",
            "What's a polite way to say no to {event}?",
            "decline {event} politely - wording?",
            "Help me write a courteous message turning down {event}.",
            "Can you suggest a nice way to refuse {event}?",
        ),
        {
            "event": slot(
                "entity",
                "a wedding invitation | a job offer | "
                "a friend's party invitation | a meeting request",
            )
        },
        twin(
            "negation",
            "how do I politely accept {event}",
            "What's a polite way to say yes to {event}?",
            "accept {event} politely - wording?",
            "Help me write a courteous message accepting {event}.",
            "Can you suggest a nice way to agree to {event}?",
        ),
    ),
)

FACTUAL = (
    intent(
        "factual/capital-city",
        (
            "what is the capital of {country}",
            "What's {country}'s capital city?",
            "capital of {country}?",
            "Which city is the capital of {country}?",
            "tell me the capital city of {country}",
        ),
        {
            "country": slot(
                "entity",
                "Australia | Canada | Brazil | Turkey | Nigeria | Switzerland | Vietnam | Morocco",
            )
        },
        twin(
            "scope",
            "what is the largest city of {country}",
            "What's {country}'s biggest city?",
            "largest city of {country}?",
            "Which city is the largest in {country}?",
            "tell me the most populous city of {country}",
        ),
    ),
    intent(
        "factual/boiling-point",
        (
            "what is the boiling point of {sub} in {unit}",
            "At what temperature does {sub} boil, in degrees {unit}?",
            "{sub} boiling point {unit}",
            "How hot does {sub} have to get to boil (in {unit})?",
            "Tell me the boiling temperature of {sub} in {unit}.",
        ),
        {
            "sub": slot("entity", "water | ethanol | acetone | mercury"),
            "unit": slot("scope", "Celsius | Fahrenheit"),
        },
        twin(
            "scope",
            "what is the freezing point of {sub} in {unit}",
            "At what temperature does {sub} freeze, in degrees {unit}?",
            "{sub} freezing point {unit}",
            "How cold does {sub} have to get to freeze (in {unit})?",
            "Tell me the freezing temperature of {sub} in {unit}.",
        ),
    ),
    intent(
        "factual/event-year",
        (
            "when did {event} happen",
            "What year was {event}?",
            "{event} year?",
            "In which year did {event} take place?",
            "Tell me when {event} occurred.",
        ),
        {
            "event": slot(
                "entity",
                "the fall of the Berlin Wall | the storming of the Bastille | "
                "the first Moon landing | the sinking of the Titanic | "
                "the signing of the Magna Carta",
            )
        },
    ),
    intent(
        "factual/nth-president",
        (
            "who was the {n} president of the united states",
            "Who served as the {n} President of the USA?",
            "{n} US president?",
            "Can you tell me who the {n} president of the U.S. was?",
            "name of the {n} American president",
        ),
        {"n": slot("number", "1st | 3rd | 16th | 26th | 32nd | 44th")},
    ),
    intent(
        "factual/inventor",
        (
            "who invented the {thing}",
            "Who is credited with inventing the {thing}?",
            "{thing} inventor?",
            "Which person invented the {thing}?",
            "tell me who came up with the {thing}",
        ),
        {
            "thing": slot(
                "entity", "telephone | printing press | World Wide Web | telescope | light bulb"
            )
        },
    ),
    intent(
        "factual/superlative-planet",
        (
            "what is the {sup} planet in our solar system",
            "Which planet is the {sup} in the solar system?",
            "{sup} planet solar system",
            "Of all the planets orbiting the Sun, which one is the {sup}?",
            "name the {sup} planet",
        ),
        {"sup": slot("scope", "largest | smallest | hottest | coldest")},
    ),
    intent(
        "factual/distance-from-earth",
        (
            "how far is {body} from earth in {unit}",
            "What's the distance between Earth and {body}, in {unit}?",
            "distance earth to {body} {unit}",
            "How many {unit} away from the Earth is {body}?",
            "Tell me how far {body} is from Earth in {unit}.",
        ),
        {
            "body": slot("entity", "the Moon | the Sun | Mars | Jupiter"),
            "unit": slot("scope", "kilometers | miles"),
        },
    ),
    intent(
        "factual/book-author",
        (
            "who wrote {book}",
            "Who is the author of {book}?",
            "{book} author",
            "Which writer wrote the novel {book}?",
            "tell me who wrote the book {book}",
        ),
        {
            "book": slot(
                "entity",
                "1984 | Pride and Prejudice | One Hundred Years of Solitude | "
                "The Brothers Karamazov | Moby-Dick",
            )
        },
        twin(
            "scope",
            "when was {book} written",
            "When was {book} published?",
            "{book} publication year",
            "In which year was the novel {book} published?",
            "tell me when the book {book} was written",
        ),
    ),
    intent(
        "factual/speed-of-sound",
        (
            "what is the speed of sound in {medium}",
            "How fast does sound travel through {medium}?",
            "speed of sound {medium}",
            "At what speed does sound move in {medium}?",
            "Tell me how quickly sound propagates in {medium}.",
        ),
        {"medium": slot("entity", "air | water | glass")},
        twin(
            "entity",
            "what is the speed of light in {medium}",
            "How fast does light travel through {medium}?",
            "speed of light {medium}",
            "At what speed does light move in {medium}?",
            "Tell me how quickly light propagates in {medium}.",
        ),
    ),
    intent(
        "factual/population-in-year",
        (
            "what was the population of {country} in {year}",
            "How many people lived in {country} in {year}?",
            "{country} population {year}",
            "What was {country}'s total population in the year {year}?",
            "Tell me the number of inhabitants of {country} in {year}.",
        ),
        {
            "country": slot("entity", "Japan | Mexico | Germany | Egypt | India"),
            "year": slot("scope", "1900 | 1950 | 2000"),
        },
    ),
    intent(
        "factual/element-symbol",
        (
            "what is the chemical symbol for {el}",
            "Which symbol represents {el} on the periodic table?",
            "{el} chemical symbol",
            "What's the element symbol of {el}?",
            "periodic table symbol for {el}?",
        ),
        {"el": slot("entity", "gold | iron | sodium | potassium | tungsten | lead")},
        twin(
            "scope",
            "what is the atomic number of {el}",
            "Which atomic number does {el} have on the periodic table?",
            "{el} atomic number",
            "What's the atomic number of the element {el}?",
            "atomic number of {el} on the periodic table?",
        ),
    ),
    intent(
        "factual/bone-count",
        (
            "how many bones are in the body of {who}",
            "How many bones does {who} have?",
            "number of bones in {who}",
            "What is the total count of bones in the skeleton of {who}?",
            "bones in {who}: how many?",
        ),
        {"who": slot("scope", "an adult human | a newborn baby")},
    ),
    intent(
        "factual/highest-point",
        (
            "what is the highest point in {cont}",
            "What's the highest elevation in {cont}?",
            "highest point {cont}",
            "What's the highest spot on the continent of {cont}?",
            "name the highest point of {cont}",
        ),
        {
            "cont": slot(
                "entity", "Africa | Europe | South America | North America | Asia | Australia"
            )
        },
        twin(
            "scope",
            "what is the lowest point in {cont}",
            "What's the lowest elevation in {cont}?",
            "lowest point {cont}",
            "What's the lowest spot on the continent of {cont}?",
            "name the lowest point of {cont}",
        ),
    ),
    intent(
        "factual/chemical-formula",
        (
            "what is the chemical formula of {c}",
            "What's the formula for {c}?",
            "{c} chemical formula",
            "How is {c} written as a chemical formula?",
            "give me the chemical formula for {c}",
        ),
        {"c": slot("entity", "table salt | baking soda | glucose | ammonia | methane")},
    ),
    intent(
        "factual/world-war-start",
        (
            "when did world war {n} start",
            "In what year did World War {n} begin?",
            "WW{n} start year",
            "What year marked the beginning of World War {n}?",
            "World War {n}: when did it start?",
        ),
        {"n": slot("number", "I | II")},
        twin(
            "scope",
            "when did world war {n} end",
            "In what year did World War {n} finish?",
            "WW{n} end year",
            "What year marked the end of World War {n}?",
            "World War {n}: when did it end?",
        ),
    ),
    intent(
        "factual/scientist-known-for",
        (
            "what is {sci} known for",
            "What is {sci} famous for?",
            "{sci} main contributions to science",
            "Why is {sci} important in the history of science?",
            "tell me what {sci} is best known for",
        ),
        {
            "sci": slot(
                "entity",
                "Marie Curie | Isaac Newton | Albert Einstein | Charles Darwin | Alexander Fleming",
            )
        },
    ),
    intent(
        "factual/superlative-ocean",
        (
            "which is the {sup} ocean on earth",
            "What's the {sup} ocean in the world?",
            "{sup} ocean",
            "Of the world's oceans, which one is the {sup}?",
            "name the {sup} ocean on the planet",
        ),
        {"sup": slot("scope", "largest | smallest | second-largest")},
    ),
    intent(
        "factual/sky-blue",
        (
            "why is the sky blue",
            "What makes the sky look blue?",
            "reason the sky is blue",
            "Can you explain why the sky appears blue during the day?",
            "why's the sky blue?",
        ),
        None,
        twin(
            "scope",
            "why is the sky red at sunset",
            "What makes the sky look red at sunset?",
            "reason the sky is red at sunset",
            "Can you explain why the sky appears red in the evening?",
            "why's the sky red at sunset?",
        ),
    ),
    intent(
        "factual/pounds-to-ounces",
        (
            "how many ounces are in {n} pounds",
            "{n} pounds is how many ounces?",
            "convert {n} lb to oz",
            "How many oz make up {n} lbs?",
            "What is {n} pounds in ounces?",
        ),
        {"n": slot("number", "2 | 3 | 5 | 10 | 25")},
        twin(
            "scope",
            "how many grams are in {n} pounds",
            "{n} pounds is how many grams?",
            "convert {n} lb to g",
            "How many g make up {n} lbs?",
            "What is {n} pounds in grams?",
        ),
    ),
    intent(
        "factual/planets-with-rings",
        (
            "which planets in the solar system have rings",
            "What planets have ring systems?",
            "planets with rings",
            "Which of the planets have rings around them?",
            "list the planets that have rings",
        ),
        None,
        twin(
            "negation",
            "which planets in the solar system don't have rings",
            "What planets have no ring systems?",
            "planets without rings",
            "Which of the planets have no rings around them?",
            "list the planets that do not have rings",
        ),
    ),
    intent(
        "factual/magnetic-metals",
        (
            "which metals are magnetic",
            "What metals are attracted to magnets?",
            "magnetic metals list",
            "Can you tell me which metals are magnetic?",
            "metals that stick to a magnet?",
        ),
        None,
        twin(
            "negation",
            "which metals are not magnetic",
            "What metals are not attracted to magnets?",
            "non-magnetic metals list",
            "Can you tell me which metals aren't magnetic?",
            "metals that don't stick to a magnet?",
        ),
    ),
    intent(
        "factual/country-currency",
        (
            "what currency is used in {country}",
            "What's the official currency of {country}?",
            "{country} currency",
            "Which money do they use in {country}?",
            "In {country}, what is the currency called?",
        ),
        {"country": slot("entity", "Switzerland | Japan | Poland | Sweden | Brazil")},
    ),
    intent(
        "factual/countries-in-continent",
        (
            "how many countries are in {cont}",
            "What is the number of countries in {cont}?",
            "{cont} number of countries",
            "How many nations does {cont} have?",
            "count of countries in {cont}?",
        ),
        {"cont": slot("entity", "Africa | Europe | South America | Asia")},
    ),
    intent(
        "factual/painter",
        (
            "who painted {p}",
            "Who is the artist behind {p}?",
            "{p} painter",
            "Which artist painted {p}?",
            "tell me who made the painting {p}",
        ),
        {
            "p": slot(
                "entity",
                "the Mona Lisa | The Starry Night | Guernica | "
                "The Birth of Venus | The Night Watch",
            )
        },
    ),
    intent(
        "factual/square-root",
        (
            "what is the square root of {n}",
            "What's the sqrt of {n}?",
            "square root {n}",
            "Can you tell me the square root of the number {n}?",
            "√{n} = ?",
        ),
        {"n": slot("number", "144 | 169 | 225 | 256 | 625")},
        twin(
            "scope",
            "what is the cube root of {n}",
            "What's the cbrt of {n}?",
            "cube root {n}",
            "Can you tell me the cube root of the number {n}?",
            "∛{n} = ?",
        ),
    ),
    intent(
        "factual/president-before",
        (
            "who was the us president before {pres}",
            "Which US president came before {pres}?",
            "president before {pres}",
            "Who preceded {pres} as President of the United States?",
            "who held the office of US president right before {pres}",
        ),
        {
            "pres": slot(
                "entity",
                "Abraham Lincoln | John F. Kennedy | Richard Nixon | "
                "Ronald Reagan | Franklin D. Roosevelt",
            )
        },
        twin(
            "scope",
            "who was the us president after {pres}",
            "Which US president came after {pres}?",
            "president after {pres}",
            "Who succeeded {pres} as President of the United States?",
            "who held the office of US president right after {pres}",
        ),
    ),
    intent(
        "factual/spoken-language",
        (
            "what language do they speak in {country}",
            "What's the official language of {country}?",
            "{country} language",
            "Which language is spoken in {country}?",
            "what do people in {country} speak",
        ),
        {"country": slot("entity", "Brazil | Austria | Argentina | Egypt | Iran")},
    ),
    intent(
        "factual/fat-soluble-vitamins",
        (
            "which vitamins are fat-soluble",
            "What vitamins dissolve in fat?",
            "fat soluble vitamins list",
            "Can you name the vitamins that are fat-soluble?",
            "list the vitamins the body stores in fat",
        ),
        None,
        twin(
            "negation",
            "which vitamins are not fat-soluble",
            "What vitamins don't dissolve in fat?",
            "non fat soluble vitamins list",
            "Can you name the vitamins that are not fat-soluble?",
            "list the vitamins the body does not store in fat",
        ),
    ),
    intent(
        "factual/euro-countries",
        (
            "which EU countries use the euro",
            "What European Union members have the euro as their currency?",
            "EU countries using the euro",
            "Can you list the EU member states that use the euro?",
            "eurozone countries in the EU?",
        ),
        None,
        twin(
            "negation",
            "which EU countries do not use the euro",
            "What European Union members don't have the euro as their currency?",
            "EU countries not using the euro",
            "Can you list the EU member states that don't use the euro?",
            "EU countries outside the eurozone?",
        ),
    ),
)

FINANCE = (
    intent(
        "finance/compound-interest",
        (
            "how much will ${p} grow to in {y} years at {r}% interest compounded annually",
            "If I invest ${p} at {r}% a year compounded annually, what will it be worth after {y} "
            "years?",
            "compound interest ${p}, {r}% annual, {y} years",
            "What's the future value of {p} dollars after {y} years with {r} percent annual "
            "compounding?",
            "calculate compound interest on ${p} at {r}% per year for {y} years",
        ),
        {
            "p": slot("number", "1,000 | 5,000 | 10,000"),
            "r": slot("number", "3 | 5 | 7"),
            "y": slot("number", "5 | 10 | 20"),
        },
        twin(
            "scope",
            "how much will ${p} grow to in {y} years at {r}% interest compounded monthly",
            "If I invest ${p} at {r}% a year compounded monthly, what will it be worth after {y} "
            "years?",
            "compound interest ${p}, {r}% annual compounded monthly, {y} years",
            "What's the future value of {p} dollars after {y} years with {r} percent monthly "
            "compounding?",
            "calculate monthly-compounded interest on ${p} at {r}% per year for {y} years",
        ),
    ),
    intent(
        "finance/mortgage-payment",
        (
            "what is the monthly payment on a ${p} mortgage at {r}% for {y} years",
            "Monthly payment for a {y}-year ${p} mortgage at {r}% interest?",
            "mortgage ${p} {r}% {y} yr monthly payment",
            "If I borrow ${p} for a house at {r} percent over {y} years, how much do I pay each "
            "month?",
            "calculate my monthly mortgage payment: ${p} loan, {r}% rate, {y}-year term",
        ),
        {
            "p": slot("number", "200,000 | 300,000 | 450,000"),
            "r": slot("number", "4 | 5.5 | 6.5"),
            "y": slot("number", "15 | 30"),
        },
        twin(
            "scope",
            "what is the total interest paid on a ${p} mortgage at {r}% for {y} years",
            "Total interest for a {y}-year ${p} mortgage at {r}% interest?",
            "mortgage ${p} {r}% {y} yr total interest",
            "If I borrow ${p} for a house at {r} percent "
            "over {y} years, how much interest do I pay "
            "in total?",
            "calculate my total mortgage interest: ${p} loan, {r}% rate, {y}-year term",
        ),
    ),
    intent(
        "finance/difference-between",
        (
            "what's the difference between {x}",
            "How do {x} differ?",
            "{x}: what's the difference?",
            "Can you explain the main differences between {x}?",
            "difference between {x}?",
        ),
        {
            "x": slot(
                "entity",
                "an ETF and a mutual fund | a Roth IRA and a traditional IRA | "
                "stocks and bonds | a 401(k) and an IRA | a credit card and a debit card",
            )
        },
    ),
    intent(
        "finance/tax-brackets",
        (
            "what are the income tax brackets in {country} for {year}",
            "{country} income tax brackets {year}",
            "What are the {year} income tax rates and brackets in {country}?",
            "Can you list the {year} tax brackets for income tax in {country}?",
            "how is income taxed in {country} in {year}, by bracket",
        ),
        {
            "country": slot("entity", "the US | the UK | Canada | Germany"),
            "year": slot("scope", "2022 | 2023 | 2024"),
        },
    ),
    intent(
        "finance/percent-change",
        (
            "what is the percentage change from {a} to {b}",
            "How do I calculate the percent change going from {a} to {b}?",
            "% change {a} to {b}",
            "If a price goes from {a} to {b}, what's the percentage change?",
            "percentage increase or decrease from {a} to {b}?",
        ),
        {"a": slot("number", "80 | 120 | 250"), "b": slot("number", "100 | 150 | 200")},
    ),
    intent(
        "finance/doubling-time",
        (
            "how long does it take to double my money at {r}% interest",
            "At {r}% a year, how many years until an investment doubles?",
            "doubling time at {r}% return",
            "If I earn {r} percent annually, when will my money double?",
            "years to double an investment at a {r}% rate",
        ),
        {"r": slot("number", "3 | 4 | 6 | 9 | 12")},
        twin(
            "scope",
            "how long does it take to triple my money at {r}% interest",
            "At {r}% a year, how many years until an investment triples?",
            "tripling time at {r}% return",
            "If I earn {r} percent annually, when will my money triple?",
            "years to triple an investment at a {r}% rate",
        ),
    ),
    intent(
        "finance/credit-score-needed",
        (
            "what credit score do I need for {loan}",
            "What's the minimum credit score to qualify for {loan}?",
            "credit score needed for {loan}",
            "How high does my credit score have to be to get {loan}?",
            "min credit score {loan}?",
        ),
        {
            "loan": slot(
                "entity", "an FHA loan | a conventional mortgage | a car loan | a credit card"
            )
        },
    ),
    intent(
        "finance/contribution-limit",
        (
            "what is the {plan} contribution limit for {year}",
            "How much can I put into my {plan} in {year}?",
            "{year} {plan} max contribution",
            "What's the maximum I'm allowed to contribute to my {plan} in {year}?",
            "{plan} contribution limit {year}",
        ),
        {
            "plan": slot("entity", "401(k) | IRA | HSA | SIMPLE IRA"),
            "year": slot("scope", "2023 | 2024 | 2025"),
        },
    ),
    intent(
        "finance/apr-to-apy",
        (
            "convert an APR of {r}% to APY",
            "What APY does a {r}% APR correspond to?",
            "{r}% APR to APY",
            "If the APR is {r} percent, what's the equivalent APY?",
            "what is the APY for a {r}% APR",
        ),
        {"r": slot("number", "6 | 12 | 20 | 24")},
        twin(
            "scope",
            "convert an APY of {r}% to APR",
            "What APR does a {r}% APY correspond to?",
            "{r}% APY to APR",
            "If the APY is {r} percent, what's the equivalent APR?",
            "what is the APR for a {r}% APY",
        ),
    ),
    intent(
        "finance/emergency-fund",
        (
            "my monthly expenses are ${m}, how big should my emergency fund be",
            "How much should I keep in an emergency fund if I spend ${m} a month?",
            "emergency fund size for ${m}/month expenses",
            "I spend {m} dollars every month. What's a good emergency fund amount?",
            "with ${m} in monthly costs, how much emergency savings do I need",
        ),
        {"m": slot("number", "2,000 | 3,500 | 5,000")},
    ),
    intent(
        "finance/stocks-or-bonds",
        (
            "should I invest in stocks or bonds at age {age}",
            "I'm {age} years old. Stocks or bonds?",
            "stocks vs bonds allocation at {age}",
            "At {age}, should my portfolio be mostly stocks or mostly bonds?",
            "what mix of stocks and bonds makes sense for a {age}-year-old",
        ),
        {"age": slot("number", "25 | 40 | 60")},
    ),
    intent(
        "finance/capital-gains-tax",
        (
            "how are {term} capital gains taxed in {country}",
            "What's the tax rate on {term} capital gains in {country}?",
            "{country} {term} capital gains tax",
            "How much tax do I pay on {term} capital gains in {country}?",
            "{term} capital gains tax rules in {country}?",
        ),
        {
            "term": slot("scope", "short-term | long-term"),
            "country": slot("entity", "the US | Canada | Australia"),
        },
    ),
    intent(
        "finance/tax-deductible",
        (
            "is {x} tax deductible",
            "Can I deduct {x} on my taxes?",
            "{x} tax deduction?",
            "Am I allowed to write off {x} on my income tax return?",
            "does {x} count as a tax deduction",
        ),
        {
            "x": slot(
                "entity",
                "student loan interest | a home office | "
                "mortgage interest | charitable giving | a new car purchase",
            )
        },
    ),
    intent(
        "finance/budget-rule",
        (
            "explain the {rule} budgeting rule",
            "What is the {rule} rule for budgets?",
            "{rule} budget rule?",
            "How does the {rule} budget method work?",
            "Can you tell me what the {rule} rule in personal budgeting means?",
        ),
        {"rule": slot("number", "50/30/20 | 70/20/10 | 80/20")},
    ),
    intent(
        "finance/inflation-adjusted",
        (
            "what is ${p} in {y} dollars worth in 2020 dollars",
            "How much would ${p} from {y} be in 2020 money?",
            "${p} in {y} adjusted for inflation to 2020",
            "If something cost ${p} in {y}, what would that be in 2020 dollars?",
            "inflation calculator: ${p} from {y} to 2020",
        ),
        {"p": slot("number", "50 | 100 | 1,000"), "y": slot("scope", "1970 | 1985 | 2000")},
    ),
    intent(
        "finance/interest-calculation",
        (
            "how is interest calculated on {prod}",
            "How do banks work out the interest on {prod}?",
            "{prod} interest calculation explained",
            "Can you explain how the interest on {prod} gets computed?",
            "what's the formula for interest on {prod}",
        ),
        {
            "prod": slot(
                "entity",
                "a credit card | a car loan | a savings account | a certificate of deposit",
            )
        },
    ),
    intent(
        "finance/what-is-instrument",
        (
            "what is {inst}",
            "Can you explain what {inst} is?",
            "{inst} explained",
            "What does it mean to invest in {inst}?",
            "explain {inst} in simple terms",
        ),
        {
            "inst": slot(
                "entity", "an index fund | a bond ETF | a REIT | a money market fund | a hedge fund"
            )
        },
    ),
    intent(
        "finance/prepay-or-invest",
        (
            "should I pay off my {r}% {loan} early or invest instead",
            "Is it better to invest or to pay down a {loan} at {r}% interest?",
            "{r}% {loan}: pay off early vs invest?",
            "I have a {loan} at {r} percent. Should I prepay it or put the money in the market?",
            "pay off {r}% {loan} or invest the extra cash",
        ),
        {
            "r": slot("number", "3 | 5 | 7 | 9"),
            "loan": slot("entity", "student loan | car loan | mortgage"),
        },
    ),
    intent(
        "finance/take-home-pay",
        (
            "what is my take-home pay {per} on a ${s} salary in {state}",
            "If I earn ${s} a year in {state}, how much do I take home {per} after tax?",
            "${s} salary {state} after tax {per}",
            "How much of a ${s} annual salary do I keep {per} after taxes in {state}?",
            "net pay {per} for ${s}/year in {state}",
        ),
        {
            "per": slot("scope", "per month | per year"),
            "s": slot("number", "60,000 | 75,000 | 120,000"),
            "state": slot("entity", "California | Texas | New York"),
        },
    ),
    intent(
        "finance/dividend-yield",
        (
            "what's the dividend yield of a stock priced at ${p} that pays ${d} a year",
            "Stock price ${p}, annual dividend ${d}: what is the yield?",
            "dividend yield ${d} dividend ${p} share price",
            "If a share costs ${p} and pays {d} dollars in dividends per year, what's its "
            "dividend yield?",
            "calculate the yield: ${d} annual dividend, ${p} stock",
        ),
        {"p": slot("number", "40 | 80 | 125"), "d": slot("number", "1.20 | 2.50 | 4.00")},
    ),
    intent(
        "finance/savings-goal",
        (
            "how much do I need to save each {per} to have ${g} in {y} years",
            "To reach ${g} in {y} years, what should I save every {per}?",
            "savings per {per} to hit ${g} in {y} years",
            "If I want ${g} saved within {y} years, how much do I set aside each {per}?",
            "${g} goal in {y} years: how much per {per}?",
        ),
        {
            "per": slot("scope", "month | week"),
            "g": slot("number", "10,000 | 25,000 | 50,000"),
            "y": slot("number", "2 | 3 | 5"),
        },
    ),
    intent(
        "finance/mortgage-pros-cons",
        (
            "pros and cons of a {m} mortgage",
            "What are the advantages and disadvantages of a {m} mortgage?",
            "{m} mortgage good or bad?",
            "Should I get a {m} mortgage? What are the upsides and downsides?",
            "{m} mortgage: benefits and drawbacks",
        ),
        {"m": slot("entity", "fixed-rate | variable-rate | balloon")},
    ),
    intent(
        "finance/retirement-number",
        (
            "how much money do i need to retire at {age} if i spend ${x} a year",
            "Retiring at {age} with ${x} of yearly expenses: how big a nest egg do I need?",
            "retirement savings needed: retire at {age}, spend ${x}/yr",
            "What portfolio size lets me retire at {age} and spend {x} dollars per year?",
            "nest egg to retire at {age} spending ${x} annually?",
        ),
        {
            "age": slot("number", "50 | 55 | 65"),
            "x": slot("number", "40,000 | 60,000 | 80,000"),
        },
    ),
    intent(
        "finance/fdic-coverage",
        (
            "which accounts are covered by FDIC insurance",
            "What kinds of bank products does the FDIC insure?",
            "FDIC insured accounts list",
            "Which of my accounts are protected by FDIC insurance?",
            "what does FDIC insurance cover",
        ),
        None,
        twin(
            "negation",
            "which accounts are not covered by FDIC insurance",
            "What kinds of financial products does the FDIC not insure?",
            "accounts not FDIC insured list",
            "Which of my accounts are not protected by FDIC insurance?",
            "what does FDIC insurance not cover",
        ),
    ),
    intent(
        "finance/home-sale-gains",
        (
            "do I owe capital gains tax when I sell a house I lived in for {n} years",
            "Is there tax on the profit from selling my home after living there {n} years?",
            "selling a house I lived in {n} years - capital gains tax?",
            "If I sell a house I've occupied as my home for {n} years, do I pay capital gains tax?",
            "capital gains on sale of a house I lived in for {n} years",
        ),
        {"n": slot("number", "2 | 3 | 5 | 10")},
        twin(
            "negation",
            "do I owe capital gains tax when I sell a house I never lived in, owned for {n} years",
            "Is there tax on the profit from selling a house I owned {n} years but never lived in?",
            "selling a house I owned {n} years but didn't live in - capital gains tax?",
            "If I sell a house I've owned for {n} years but never occupied, do I pay capital gains "
            "tax?",
            "capital gains on sale of a house I did not live in, owned for {n} years",
        ),
    ),
    intent(
        "finance/card-payoff-time",
        (
            "how long will it take to pay off ${b} on a "
            "credit card at {r}% APR paying ${p} a month",
            "Credit card balance ${b}, {r}% APR, ${p} monthly payments: how many months to pay it "
            "off?",
            "payoff time: ${b} balance, {r}% APR, ${p}/month",
            "If I owe ${b} on my card at {r} percent APR and pay ${p} each month, when will it be "
            "paid off?",
            "months to clear a ${b} credit card debt at {r}% with ${p} payments",
        ),
        {
            "b": slot("number", "3,000 | 5,000 | 7,500"),
            "r": slot("number", "18 | 22 | 25"),
            "p": slot("number", "150 | 200 | 300"),
        },
    ),
    intent(
        "finance/eligible-expenses",
        (
            "what can I pay for with my {acct} money",
            "Which expenses qualify for {acct} funds?",
            "{acct} eligible expenses",
            "What am I allowed to spend my {acct} on?",
            "list of things I can buy with {acct} funds",
        ),
        {"acct": slot("entity", "HSA | FSA | 529 plan")},
        twin(
            "negation",
            "what can't I pay for with my {acct} money",
            "Which expenses do not qualify for {acct} funds?",
            "{acct} ineligible expenses",
            "What am I not allowed to spend my {acct} on?",
            "list of things I cannot buy with {acct} funds",
        ),
    ),
)

VOLATILE = (
    intent(
        "volatile/weather",
        (
            "what's the weather in {city} {when}",
            "Weather forecast for {city} {when}?",
            "{city} weather {when}",
            "How's the weather looking in {city} {when}?",
            "Tell me the weather in {city} {when}, please.",
        ),
        {
            "city": slot("entity", _CITIES),
            "when": slot("scope", "today | tomorrow | this weekend"),
        },
    ),
    intent(
        "volatile/rain",
        (
            "will it rain in {city} {when}",
            "Is rain expected in {city} {when}?",
            "{city} rain {when}?",
            "Do I need an umbrella in {city} {when}?",
            "any chance of rain in {city} {when}",
        ),
        {
            "city": slot("entity", _CITIES),
            "when": slot("scope", "today | tomorrow | tonight"),
        },
    ),
    intent(
        "volatile/stock-price",
        (
            "what is the current price of {t} stock",
            "How much is {t} trading at right now?",
            "{t} share price now",
            "What's {t} stock at right now?",
            "current {t} stock quote",
        ),
        {"t": slot("entity", _TICKERS)},
        twin(
            "scope",
            "what was the closing price of {t} stock yesterday",
            "How much did {t} close at yesterday?",
            "{t} share price yesterday close",
            "What was {t} stock at when the market closed yesterday?",
            "yesterday's {t} closing quote",
        ),
    ),
    intent(
        "volatile/crypto-price",
        (
            "what's the price of {coin} in {cur} right now",
            "How much is one {coin} worth in {cur} at the moment?",
            "{coin} price {cur} now",
            "current {coin} price in {cur}",
            "What does {coin} cost in {cur} right now?",
        ),
        {
            "coin": slot("entity", "Bitcoin | Ethereum | Solana | Dogecoin"),
            "cur": slot("scope", "US dollars | euros | British pounds"),
        },
    ),
    intent(
        "volatile/last-game-score",
        (
            "what was the score of the {team} game last night",
            "Did the {team} win last night? What was the score?",
            "{team} score last night",
            "How did the {team} do in last night's game?",
            "final score {team} game last night",
        ),
        {"team": slot("entity", "Lakers | Yankees | Celtics | Dodgers | Warriors")},
        twin(
            "scope",
            "when is the next {team} game",
            "When do the {team} play next? What time is the game?",
            "{team} next game",
            "When is the {team}'s next game?",
            "next {team} game time",
        ),
    ),
    intent(
        "volatile/exchange-rate",
        (
            "what is the exchange rate from {a} to {b} today",
            "How many {b} is 1 {a} right now?",
            "{a} to {b} rate today",
            "current {a}/{b} exchange rate",
            "What's 1 {a} in {b} at today's rate?",
        ),
        {"a": slot("entity", "USD | GBP | AUD"), "b": slot("entity", "EUR | JPY | INR")},
    ),
    intent(
        "volatile/news-headlines",
        (
            "what are the top news headlines about {topic} {when}",
            "Give me the latest {topic} news {when}.",
            "{topic} news {when}",
            "What's happening in {topic} {when}?",
            "Any major {topic} headlines {when}?",
        ),
        {
            "topic": slot("entity", "technology | politics | sports | science"),
            "when": slot("scope", "today | this week"),
        },
    ),
    intent(
        "volatile/store-open",
        (
            "is {store} open {when}",
            "Can I still go to {store} {when}, are they open?",
            "{store} open {when}?",
            "Are {store} stores open {when}?",
            "check if {store} is open {when}",
        ),
        {
            "store": slot("entity", "Costco | Walmart | Target | Walgreens | Trader Joe's"),
            "when": slot("scope", "right now | on Sunday | on Christmas Day"),
        },
    ),
    intent(
        "volatile/traffic",
        (
            "how is the traffic on {road} right now",
            "Is there a lot of traffic on {road} at the moment?",
            "{road} traffic now",
            "Any jams or delays on {road} currently?",
            "current traffic conditions {road}",
        ),
        {"road": slot("entity", "I-95 | the M25 | the 405 | the Bay Bridge | the A1")},
    ),
    intent(
        "volatile/flight-status",
        (
            "is flight {f} on time",
            "What's the current status of flight {f}?",
            "{f} flight status",
            "Is {f} on schedule or delayed?",
            "check whether {f} is delayed or on time today",
        ),
        {"f": slot("entity", "BA283 | UA901 | AF1680 | LH400 | QF1")},
    ),
    intent(
        "volatile/gas-price",
        (
            "what is the average gas price in {place} today",
            "How much does a gallon of gas cost in {place} right now?",
            "{place} gas prices today",
            "current price of gasoline in {place}",
            "What are people paying for gas in {place} at the moment?",
        ),
        {"place": slot("entity", "California | Texas | Ohio | Florida")},
    ),
    intent(
        "volatile/league-standings",
        (
            "what are the current standings in {league}",
            "Show me the {league} table as it stands now.",
            "{league} standings today",
            "How does the {league} table look right now?",
            "latest {league} rankings",
        ),
        {"league": slot("entity", "Premier League | La Liga | Bundesliga | Serie A")},
        twin(
            "scope",
            "what were the final standings in {league} last season",
            "Show me the {league} table as it ended last season.",
            "{league} standings last season",
            "How did the {league} table look at the end of last season?",
            "final {league} rankings last season",
        ),
    ),
    intent(
        "volatile/earthquake",
        (
            "was there an earthquake in {place} today",
            "Did an earthquake hit {place} today?",
            "{place} earthquake today",
            "Any earthquakes reported in {place} today?",
            "latest earthquake news {place} today",
        ),
        {"place": slot("entity", "California | Japan | Turkey | Chile | Indonesia")},
    ),
    intent(
        "volatile/index-move",
        (
            "how is the {idx} doing {when}",
            "Is the {idx} up or down {when}?",
            "{idx} performance {when}",
            "How much has the {idx} moved {when}?",
            "{idx} change {when}?",
        ),
        {
            "idx": slot("entity", "S&P 500 | Nasdaq | Dow | FTSE 100 | Nikkei 225"),
            "when": slot("scope", "today | this week | this month"),
        },
    ),
    intent(
        "volatile/air-quality",
        (
            "what is the air quality in {city} right now",
            "How's the AQI in {city} at the moment?",
            "{city} air quality now",
            "Current air quality index for {city}?",
            "air pollution level in {city} currently",
        ),
        {"city": slot("entity", "Delhi | Beijing | Los Angeles | London | Mexico City")},
    ),
    intent(
        "volatile/sunset-time",
        (
            "what time is sunset in {city} {when}",
            "When does the sun set in {city} {when}?",
            "{city} sunset time {when}",
            "At what time will the sun go down in {city} {when}?",
            "sunset {city} {when}?",
        ),
        {
            "city": slot("entity", _CITIES),
            "when": slot("scope", "today | tomorrow"),
        },
        twin(
            "scope",
            "what time is sunrise in {city} {when}",
            "When does the sun rise in {city} {when}?",
            "{city} sunrise time {when}",
            "At what time will the sun come up in {city} {when}?",
            "sunrise {city} {when}?",
        ),
    ),
    intent(
        "volatile/local-time",
        (
            "what time is it in {city} right now",
            "What's the current time in {city}?",
            "time in {city} now",
            "Can you tell me the local time in {city} at the moment?",
            "{city} current local time?",
        ),
        {"city": slot("entity", _CITIES)},
    ),
    intent(
        "volatile/box-office",
        (
            "what's the number one movie at the box office this weekend",
            "Which film is topping the box office this weekend?",
            "box office #1 this weekend",
            "What movie made the most money in theaters this weekend?",
            "top grossing movie this weekend",
        ),
        None,
        twin(
            "scope",
            "what was the number one movie at the box office last weekend",
            "Which film topped the box office last weekend?",
            "box office #1 last weekend",
            "What movie made the most money in theaters last weekend?",
            "top grossing movie last weekend",
        ),
    ),
    intent(
        "volatile/central-bank-rate",
        (
            "what is the {bank} interest rate right now",
            "Current {bank} policy rate?",
            "{bank} rate today",
            "What has the {bank} set its key interest rate to at the moment?",
            "latest {bank} interest rate",
        ),
        {"bank": slot("entity", "Fed | ECB | Bank of England | Bank of Japan")},
    ),
    intent(
        "volatile/mortgage-rates-today",
        (
            "what are {term} mortgage rates today",
            "Current average {term} mortgage rate?",
            "{term} mortgage rate today",
            "How high are {term} mortgage rates right now?",
            "today's {term} mortgage rates",
        ),
        {"term": slot("scope", "30-year fixed | 15-year fixed | 5/1 ARM")},
    ),
    intent(
        "volatile/concert-tickets",
        (
            "are there still tickets available for {artist} in {city}",
            "Can I still buy tickets to see {artist} in {city}?",
            "{artist} {city} tickets still available?",
            "Can I still get tickets for the {artist} show in {city}?",
            "any tickets left for {artist} in {city}",
        ),
        {
            "artist": slot("entity", "Taylor Swift | Coldplay | Ed Sheeran | Beyoncé"),
            "city": slot("entity", "London | Chicago | Paris"),
        },
    ),
    intent(
        "volatile/site-down",
        (
            "is {site} down right now",
            "Is {site} having an outage at the moment?",
            "{site} down?",
            "Anyone else having problems with {site} right now, or is it just me?",
            "current {site} outage status",
        ),
        {"site": slot("entity", "Gmail | YouTube | Instagram | Slack | Netflix")},
    ),
    intent(
        "volatile/commodity-price",
        (
            "what is the price of {c} right now",
            "How much is {c} trading for at the moment?",
            "{c} price today",
            "current {c} spot price",
            "What's {c} going for on the market now?",
        ),
        {"c": slot("entity", "gold | silver | crude oil | copper | natural gas")},
        twin(
            "scope",
            "what was the price of {c} a year ago",
            "How much was {c} trading for a year ago?",
            "{c} price a year ago",
            "{c} spot price one year ago",
            "What was {c} going for on the market a year ago?",
        ),
    ),
    intent(
        "volatile/snow-report",
        (
            "what are the snow conditions at {r} today",
            "How's the snow at {r} right now?",
            "{r} snow report today",
            "Is the skiing good at {r} today? Snow conditions?",
            "current snow conditions {r}",
        ),
        {"r": slot("entity", "Whistler | Zermatt | Aspen | Chamonix | Niseko")},
    ),
    intent(
        "volatile/ride-wait",
        (
            "what is the wait time for {ride} right now",
            "How long is the line for {ride} at the moment?",
            "{ride} wait time now",
            "Current queue time for {ride}?",
            "how long would I wait to get on {ride} right now",
        ),
        {"ride": slot("entity", "Space Mountain | the Haunted Mansion | Pirates of the Caribbean")},
    ),
    intent(
        "volatile/trending",
        (
            "what's trending on {p} {when}",
            "What are the top trending topics on {p} {when}?",
            "{p} trends {when}",
            "Show me what's popular on {p} {when}.",
            "trending {p} {when}?",
        ),
        {
            "p": slot("entity", "Twitter | TikTok | YouTube | Reddit"),
            "when": slot("scope", "today | this week"),
        },
    ),
    intent(
        "volatile/high-temperature",
        (
            "what is the high temperature in {city} {when}",
            "How hot will it get in {city} {when}?",
            "{city} high temp {when}",
            "What's the maximum temperature forecast for {city} {when}?",
            "daytime high {city} {when}?",
        ),
        {"city": slot("entity", _CITIES), "when": slot("scope", "today | tomorrow")},
        twin(
            "scope",
            "what is the low temperature in {city} {when}",
            "How cold will it get in {city} {when}?",
            "{city} low temp {when}",
            "What's the minimum temperature forecast for {city} {when}?",
            "overnight low {city} {when}?",
        ),
    ),
    intent(
        "volatile/multi-day-forecast",
        (
            "{n}-day weather forecast for {city}",
            "What's the forecast for {city} over the next {n} days?",
            "{city} weather next {n} days",
            "Can you give me the {n} day outlook for the weather in {city}?",
            "how will the weather be in {city} for the coming {n} days",
        ),
        {"n": slot("number", "3 | 5 | 7 | 10"), "city": slot("entity", _CITIES)},
    ),
    intent(
        "volatile/top-movers",
        (
            "what are the top {n} gainers in the {idx} today",
            "Which {n} stocks in the {idx} are up the most today?",
            "{idx} top {n} gainers today",
            "Show me today's {n} biggest winners in the {idx}.",
            "top {n} best performing {idx} stocks today",
        ),
        {
            "n": slot("number", "3 | 5 | 10"),
            "idx": slot("entity", "S&P 500 | Nasdaq 100 | FTSE 100"),
        },
        twin(
            "scope",
            "what are the top {n} losers in the {idx} today",
            "Which {n} stocks in the {idx} are down the most today?",
            "{idx} top {n} losers today",
            "Show me today's {n} biggest losers in the {idx}.",
            "top {n} worst performing {idx} stocks today",
        ),
    ),
    intent(
        "volatile/subway-delays",
        (
            "which {city} subway lines have delays right now",
            "Are any {city} metro lines delayed at the moment, and which?",
            "{city} subway delays now",
            "What {city} underground lines are currently running late?",
            "list of delayed {city} subway lines right now",
        ),
        {"city": slot("entity", "New York | London | Paris | Tokyo")},
        twin(
            "negation",
            "which {city} subway lines have no delays right now",
            "Are any {city} metro lines running without delays at the moment, and which?",
            "{city} subway lines without delays now",
            "What {city} underground lines are currently running on time?",
            "list of on-time {city} subway lines right now",
        ),
    ),
    intent(
        "volatile/rain-next-hours",
        (
            "will it rain in {city} in the next {n} hours",
            "Is rain expected in {city} within the next {n} hours?",
            "{city} rain next {n} hours?",
            "Do I need an umbrella in {city} during the next {n} hours?",
            "chance of rain in {city} over the next {n} hours",
        ),
        {"city": slot("entity", _CITIES), "n": slot("number", "2 | 3 | 6 | 12")},
    ),
)

INTENTS: tuple[Intent, ...] = CODE + CHAT + FACTUAL + FINANCE + VOLATILE


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def validate(intents: tuple[Intent, ...] = INTENTS) -> None:
    """Refuse an intent that could pair queries whose answers differ as paraphrases: a template
    missing a slot would drop information, so every template and twin names every slot."""
    ids = [i.id for i in intents]
    if len(set(ids)) != len(ids):
        raise ValueError("intent ids repeat")
    for it in intents:
        if it.category not in CATEGORIES:
            raise ValueError(f"{it.id}: unknown category")
        if not 4 <= len(it.templates) <= 6 or len(set(it.templates)) != len(it.templates):
            raise ValueError(f"{it.id}: needs 4-6 distinct templates")
        for tpl in (*it.templates, *(t for tw in it.twins for t in tw.templates)):
            if _fields(tpl) != set(it.slots):
                raise ValueError(f"{it.id}: {tpl!r} does not name exactly {sorted(it.slots)}")
        for tw in it.twins:
            if tw.kind not in KINDS or len(tw.templates) != len(it.templates):
                raise ValueError(f"{it.id}: a twin needs a known kind and parallel templates")
            if set(tw.templates) & set(it.templates):
                raise ValueError(f"{it.id}: a twin template repeats a template")
        for name, s in it.slots.items():
            if s.kind is not None and s.kind not in KINDS:
                raise ValueError(f"{it.id}: slot {name} has unknown kind {s.kind}")
            if len(set(s.values)) != len(s.values) or not s.values:
                raise ValueError(f"{it.id}: slot {name} needs distinct values")


def splits(intents: tuple[Intent, ...] = INTENTS) -> dict[str, str]:
    """Intent id -> split. Within each category the intents ranked first by the sha256 of their
    id go to `tune`; the ranking depends on the id alone, so adding an intent moves no other."""
    out: dict[str, str] = {}
    for category in CATEGORIES:
        ids = sorted(
            (i.id for i in intents if i.category == category),
            key=lambda x: hashlib.sha256(x.encode()).hexdigest(),
        )
        n_tune = round(TUNE_SHARE * len(ids))
        out.update({x: "tune" if k < n_tune else "test" for k, x in enumerate(ids)})
    return out


class _Drawer:
    """Draws the pairs of one intent and one label, each new to `seen`; a random.Random seeded
    by a string is the same in every process, so the draw is reproducible."""

    def __init__(self, it: Intent, label: str, seed: int) -> None:
        self.it = it
        self.label = label
        self.rng = random.Random(f"{seed}:{it.id}:{label}")
        self.n = 0
        # Near-miss sources: ("slot", name, kind) or ("twin", index, kind).
        self.sources: list[tuple[str, str, str]] = [
            ("slot", name, s.kind)
            for name, s in it.slots.items()
            if s.kind is not None and len(s.values) > 1
        ]
        self.sources += [("twin", str(k), tw.kind) for k, tw in enumerate(it.twins)]

    def _values(self) -> dict[str, str]:
        return {name: self.rng.choice(s.values) for name, s in self.it.slots.items()}

    def _paraphrase(self) -> tuple[str, str, str]:
        values = self._values()
        i, j = self.rng.sample(range(len(self.it.templates)), 2)
        return (
            "paraphrase",
            self.it.templates[i].format(**values),
            self.it.templates[j].format(**values),
        )

    def _near_miss(self, step: int) -> tuple[str, str, str]:
        """Source `step % len(sources)`; the same template (one edit apart) on the first pass
        over the sources, another template (paraphrased as well) on the next, and so on."""
        source, key, kind = self.sources[step % len(self.sources)]
        same = (step // len(self.sources)) % 2 == 0
        n = len(self.it.templates)
        i = self.rng.randrange(n)
        j = i if same else self.rng.choice([k for k in range(n) if k != i])
        values = self._values()
        if source == "slot":
            other = dict(values)
            other[key] = self.rng.choice([v for v in self.it.slots[key].values if v != values[key]])
            return kind, self.it.templates[i].format(**values), self.it.templates[j].format(**other)
        twin_templates = self.it.twins[int(key)].templates
        return kind, self.it.templates[i].format(**values), twin_templates[j].format(**values)

    def capable(self) -> bool:
        return self.label == "paraphrase" or bool(self.sources)

    def next(self, seen: set[frozenset[str]]) -> tuple[str, str, str] | None:
        """The next new pair (kind, a, b), or None once no source yields one."""
        tries = 1 if self.label == "paraphrase" else 2 * len(self.sources)
        for offset in range(tries):
            for _ in range(_ATTEMPTS):
                if self.label == "paraphrase":
                    kind, a, b = self._paraphrase()
                else:
                    kind, a, b = self._near_miss(self.n + offset)
                key = frozenset((a, b))
                if a == b or key in seen:
                    continue
                seen.add(key)
                self.n += offset + 1
                if self.rng.random() < 0.5:
                    a, b = b, a
                return kind, a, b
        return None


def build(seed: int = SEED, per_label: int = PER_LABEL) -> list[Pair]:
    """All pairs: per category and label, one pair per intent in turn until `per_label`, so that
    every intent contributes about equally. Raises if a category falls short of its minimums."""
    validate()
    split_of = splits()
    seen: set[frozenset[str]] = set()
    pairs: list[Pair] = []
    for category in CATEGORIES:
        intents = [i for i in INTENTS if i.category == category]
        drawn: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        for label in LABELS:
            drawers = [d for d in (_Drawer(i, label, seed) for i in intents) if d.capable()]
            count = 0
            while count < per_label and drawers:
                for d in list(drawers):
                    if count == per_label:
                        break
                    pair = d.next(seen)
                    if pair is None:
                        drawers.remove(d)
                        continue
                    drawn.setdefault((d.it.id, label), []).append(pair)
                    count += 1
            if count < per_label:
                raise ValueError(f"{category}: only {count} {label} pairs")
        k = 0
        for it in intents:
            for label in LABELS:
                for kind, a, b in drawn.get((it.id, label), []):
                    k += 1
                    pairs.append(
                        Pair(
                            f"{category}-{k:04d}",
                            category,
                            it.id,
                            split_of[it.id],
                            label,
                            kind,
                            a,
                            b,
                        )
                    )
    _check(pairs)
    return pairs


def _check(pairs: list[Pair]) -> None:
    """The invariants the measurement relies on, so a broken edit fails here, not in tuning."""
    keys = [frozenset((p.a, p.b)) for p in pairs]
    if len(set(keys)) != len(keys) or any(p.a == p.b or not p.a or not p.b for p in pairs):
        raise ValueError("a pair repeats, or has equal or empty strings")
    intent_splits: dict[str, set[str]] = {}
    for p in pairs:
        intent_splits.setdefault(p.intent, set()).add(p.split)
    if any(len(s) != 1 for s in intent_splits.values()):
        raise ValueError("an intent is in both splits")
    for category in CATEGORIES:
        mine = [p for p in pairs if p.category == category]
        for split in ("tune", "test"):
            labels = {p.label for p in mine if p.split == split}
            if labels != set(LABELS):
                raise ValueError(f"{category}/{split} lacks a label: has {sorted(labels)}")
        kinds = {p.kind for p in mine if p.label == "near_miss"}
        missing = set(REQUIRED_KINDS[category]) - kinds
        if missing or len(kinds) < MIN_KINDS:
            raise ValueError(f"{category}: near-miss kinds {sorted(kinds)}, missing {missing}")


def render(pairs: list[Pair], seed: int = SEED) -> str:
    """The frozen file's text: indent 1 keeps it reviewable line by line in a diff."""
    doc = {
        "version": 1,
        "description": (
            "Query pairs for measuring a semantic response cache, built by "
            "loadtest/semantic_pairs.py from hand-written intents (templates, slot values and "
            "contrasting twins) with a fixed seed, and frozen before any embedding model or "
            "threshold was tried. label 'paraphrase': same intent and slot values in two "
            "wordings, one answer serves both (measures recall). label 'near_miss': alike but "
            "needing another answer (measures false hits); kind says how they differ: number, "
            "entity, negation, scope or code_variant. split: whole intents, about 40% 'tune' "
            "(for choosing thresholds) and the rest 'test' (for reporting). Rebuild with "
            "`python -m duetserve.loadtest.semantic_pairs --out docs/bench/semantic_pairs.json`; "
            "`--check FILE` verifies a file is this output."
        ),
        "seed": seed,
        "pairs": [
            {
                "id": p.id,
                "category": p.category,
                "intent": p.intent,
                "split": p.split,
                "label": p.label,
                "kind": p.kind,
                "a": p.a,
                "b": p.b,
            }
            for p in pairs
        ],
    }
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def summary(pairs: list[Pair]) -> str:
    """Counts per category, split, label and kind: the table a reviewer checks first."""
    counts = Counter((p.category, p.split, p.label, p.kind) for p in pairs)
    cols = ("paraphrase", *KINDS)
    lines = [f"{'category/split':18}" + "".join(f"{c:>13}" for c in cols)]
    for category in CATEGORIES:
        for split in ("tune", "test"):
            row = [counts[(category, split, "paraphrase", "paraphrase")]]
            row += [counts[(category, split, "near_miss", k)] for k in KINDS]
            lines.append(f"{category + '/' + split:18}" + "".join(f"{v:>13}" for v in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="write the dataset here")
    group.add_argument("--check", type=Path, help="exit 1 unless this file is the generator's")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    pairs = build(args.seed)
    text = render(pairs, args.seed)
    if args.check is not None:
        if args.check.read_text(encoding="utf-8") != text:
            print(f"{args.check} differs from the generator's output", file=sys.stderr)
            sys.exit(1)
        print(f"{args.check} matches ({len(pairs)} pairs)")
        return
    args.out.write_text(text, encoding="utf-8")
    print(summary(pairs))
    print(f"wrote {len(pairs)} pairs to {args.out}")


if __name__ == "__main__":
    main()
