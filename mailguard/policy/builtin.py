"""The built-in policy: the rules of policies/default.toml, with no organisation.

Used by `mailguard check` when no policy file is given (with `--internal` to say who "we" are).
A test keeps these rules identical to policies/default.toml.
"""

from __future__ import annotations

from mailguard.policy.model import Policy

BUILTIN_POLICY_TOML = """\
[defaults]
lang = "ja"
hold_for = "5m"
confirm_timeout = "1d"
on_timeout = "cancel"

[[rule]]
name = "bulk-to-bcc"
description = "10 件以上の社外アドレスが To/Cc に見えている一斉送信は Bcc に移す"
when = "recipient.visible_external >= 10"
action = "bcc"
options = { to_placeholder = "undisclosed", keep_internal_visible = true }

[[rule]]
name = "several-companies-visible"
description = "複数社の宛先がお互いに見える: 送信者に確認する"
when = "recipient.external_parties >= 2 and recipient.visible_external < 10"
action = "confirm"

[[rule]]
name = "lookalike-domain"
description = "社内・取引先に似たドメイン (examp1e.co.jp など) は確認する"
when = "domain.lookalike"
action = "confirm"

[[rule]]
name = "first-time-domain"
description = "これまで送信したことのないドメインは確認する"
when = "domain.first_time"
action = "confirm"

[[rule]]
name = "nonexistent-domain"
description = "存在しない・メールを受け取らないドメインは送信しない"
when = ["domain.nonexistent", "domain.null_mx"]
action = "reject"
reject_message = "Recipient domain does not exist or accepts no mail; please check the address"

[[rule]]
name = "dns-unavailable"
description = "DNS で確認できなかった: 記録だけして送る (厳しくするなら hold に)"
when = "domain.dns_unavailable"
action = "pass"

[[rule]]
name = "history-unavailable"
description = "送信履歴 (共有ストア) を参照できない間: 記録だけして送る (止めるなら confirm に)"
# The history store is down, so "first time?" cannot be answered. pass: mail keeps flowing and
# the finding is logged and counted. confirm/hold/approve would need the same store to keep the
# message, so while it is down that mail is answered 451 and waits in Postfix's queue instead.
when = "domain.history_unavailable"
action = "pass"

[[rule]]
name = "protect-attachments"
description = "社外宛ての暗号化されていない添付はパスワード付き ZIP に (パスワードは送信者へ)"
when = "attachment.unencrypted and recipient.external"
action = "zip"
options = { method = "aes", password_to = "sender" }

[[rule]]
name = "attachment-unchecked"
description = "検査しきれなかった社外宛て (暗号化不明・上限超過・深い入れ子など) は確認する"
# What the guard could not inspect (encryption unknown, a bound hit, MIME nested too deep) or
# cannot zip (files written into the text body) is never treated as harmless.
when = [
    "attachment.unknown and recipient.external",
    "attachment.limit",
    "message.limit and recipient.external",
    "attachment.inline and recipient.external",
]
action = "confirm"
"""


def builtin_policy() -> Policy:
    from mailguard.policy.parse import parse_policy

    return parse_policy(BUILTIN_POLICY_TOML, "<builtin>")
