"""Issue 11, promise 5 — notice languages, through `mailguard serve` (tests/e2e_support.py).

* `[notify] lang = "ja+en"` → ONE notice mail holding both the Japanese and the English text.
* A policy with `[defaults] lang = "en"` under `[notify] lang = "ja"` → the hold / confirm
  notice about mail that policy decided is in English (the policy's language wins).

Assumed: a policy without `[defaults] lang` leaves the notice language to `notify.lang`.
"Japanese text" = kana present; "English text" = several common English words present; "in
English only" = no kana or kanji anywhere in the decoded notice (all test data is ASCII).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_support import CJK, KANA, Guard, english_words, policy, stays_false

CONFIRM = """
[[rule]]
name = "confirm-out"
when = "recipient.external"
action = "confirm"
"""
HOLD = """
[[rule]]
name = "hold-out"
when = "recipient.external"
action = "hold"
hold_for = "1h"
"""


def test_ja_en_sends_one_notice_with_both_languages(tmp_path: Path) -> None:
    cfg = {"notify": {"lang": "ja+en"}}
    with Guard(tmp_path, policy_text=policy(CONFIRM, defaults=""), config_extra=cfg) as g:
        sent = g.send(to=["Tanaka <tanaka@customer-a.co.jp>"], subject="Quarterly figures")
        assert sent.held_id, f"{sent.code} {sent.text}"
        notice = g.wait_notice("confirm", about=sent)
        assert stays_false(lambda: len(g.notices_about(sent, "confirm")) > 1, 1.5), (
            "ja+en sent the confirm notice more than once"
        )
        text = notice.text
        assert KANA.search(text), f"no Japanese in the ja+en notice:\n{text}"
        words = english_words(text)
        assert len(words) >= 4, f"no English in the ja+en notice (words: {words}):\n{text}"


@pytest.mark.parametrize(
    ("rule", "kind"), [(HOLD, "held"), (CONFIRM, "confirm")], ids=["hold", "confirm"]
)
def test_policy_language_wins_for_its_notices(tmp_path: Path, rule: str, kind: str) -> None:
    cfg = {"notify": {"lang": "ja"}}
    with Guard(tmp_path, policy_text=policy(rule, defaults='lang = "en"'), config_extra=cfg) as g:
        sent = g.send(to=["Tanaka <tanaka@customer-a.co.jp>"], subject="Quarterly figures")
        assert sent.held_id, f"{sent.code} {sent.text}"
        text = g.wait_notice(kind, about=sent).text
        assert not CJK.search(text), f"the {kind} notice is not English only:\n{text}"
        assert len(english_words(text)) >= 4, text
