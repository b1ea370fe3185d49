"""Web stage: the sender's confirm pages (/m/<token>), the admin JSON API (/api/), /healthz.

A GET never changes state: mail security gateways and link scanners open every link in a mail,
so GET/HEAD only show the page and a POST acts. The POST must carry a CSRF value (HMAC of token,
action and issue time under the server secret) from a page rendered at most an hour earlier.
Unknown tokens (misses) are counted per client address and for all clients together, in the store
(`HeldStore.rate_hit`): every node on a shared PostgreSQL store spends the same budget, and a
restart does not reset it. Past either budget an unknown token is answered 429 instead of 404,
so guessing a 192-bit token is hopeless and noisy. A valid token is never refused for its
client's misses: the lookup comes first, so people behind one proxy address are not locked out
by a guesser among them. The client address is
the TCP peer, or — only when the peer is a configured trusted proxy — the address the proxy puts
in `client_ip_header` (X-Forwarded-For: the right-most address that is not a trusted proxy).
Failed admin-API logins are throttled the same way (per client and for all clients together);
a throttled client is refused without its token being compared. Pages are self-contained
(inline CSS, no scripts, no external assets), in Japanese and English (Accept-Language,
`?lang=`), and sent with no-referrer / no-store / noindex headers. Tokens never reach a log
line: use `start_web()` (or pass `access_log_class=RedactingAccessLogger` to your AppRunner) to
keep them out of access logs.

The page shows the message's `Summary` as the queue stored it (`Summary.from_json(held.summary)`):
internal and external recipients (external grouped by organisation, with display names), the
findings in plain words, attachment names and sizes, and the actions `PageView.actions` allows.
Every value from the message is data: made one safe line by `mailguard.textsafe` (no CR/LF,
control or bidi characters, capped, URLs defanged) and shown in visible quotes; the page links
nothing but its own language switch.
With `metrics`, every POST to a page counts in mailguard_confirm_posts_total{outcome} and every
action carried out observes the time from arrival to the person's decision.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import yarl
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mailguard.errors import StoreError
from mailguard.logfmt import install_redaction, redact_tokens
from mailguard.notify.render import human_size
from mailguard.queue.service import HoldService
from mailguard.queue.store import Budget, Held, HeldStore, State, TokenError, TransitionError
from mailguard.summary import Recipient, Summary
from mailguard.textsafe import NAME_LIMIT, data_text, quoted

if TYPE_CHECKING:
    from mailguard.metrics import Metrics

log = logging.getLogger("mailguard.web")

TEMPLATES = Path(__file__).with_name("templates")
TOKEN_RE = r"[A-Za-z0-9_-]{16,128}"
CSRF_MAX_AGE = 3600.0
SERVER_NAME = "MailGuard"  # the Server: header, without versions
METRICS_ACCESS = ("open", "token", "off")

SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Robots-Tag": "noindex, nofollow, noarchive",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}

# Page strings: ja and en side by side, so a translation is never missing.
T: dict[str, dict[str, str]] = {
    "title.hold": {"ja": "送信保留中のメール", "en": "Message on hold"},
    "title.confirm": {"ja": "送信確認", "en": "Confirm your message"},
    "title.approve": {"ja": "送信承認", "en": "Approve this message"},
    "title.pending": {"ja": "承認待ちのメール", "en": "Waiting for approval"},
    "lead.hold": {
        "ja": "このメールは保留中で、{due} に自動的に送信されます。"
        "送信をやめる場合は「取り消す」を押してください。",
        "en": "This message is on hold and will be sent automatically at {due}. "
        "Press “Cancel” to stop it.",
    },
    "lead.hold_now": {
        "ja": "このメールは保留中で、{due} に自動的に送信されます。"
        "宛先を確認できたら「今すぐ送信する」、送信をやめる場合は「取り消す」を押してください。",
        "en": "This message is on hold and will be sent automatically at {due}. "
        "Press “Send now” once you have checked it, or “Cancel” to stop it.",
    },
    "lead.confirm": {
        "ja": "宛先と添付ファイルを確認してください。{due} までに確認がない場合は{timeout}。",
        "en": "Check the recipients and attachments. Without an answer by {due} it will be "
        "{timeout}.",
    },
    "lead.approve": {
        "ja": "{sender} さんのメールが承認を待っています。{due} までに判断がない場合は{timeout}。",
        "en": "A message from {sender} is waiting for your approval. Without a decision by "
        "{due} it will be {timeout}.",
    },
    "lead.pending": {
        "ja": "承認者の承認後に送信されます。送信をやめる場合は「取り消す」を押してください。",
        "en": "It will be sent once approved. Press “Cancel” to stop it.",
    },
    "timeout.send": {"ja": "送信されます", "en": "sent"},
    "timeout.cancel": {"ja": "取り消されます", "en": "cancelled"},
    "subject": {"ja": "件名", "en": "Subject"},
    "from": {"ja": "差出人", "en": "From"},
    "envelope_from": {"ja": "送信元（エンベロープ）", "en": "envelope sender"},
    "external": {"ja": "社外の宛先", "en": "External recipients"},
    "internal": {"ja": "社内の宛先", "en": "Internal recipients"},
    "findings": {"ja": "確認が必要な理由", "en": "Why this needs a look"},
    "attachments": {"ja": "添付ファイル", "en": "Attachments"},
    "none": {"ja": "なし", "en": "none"},
    "orgs": {"ja": "{n} 社", "en": "{n} organisations"},
    "org": {"ja": "1 社", "en": "1 organisation"},
    "field.cc": {"ja": "Cc", "en": "Cc"},
    "field.bcc": {"ja": "Bcc", "en": "Bcc"},
    "field.hidden": {"ja": "Bcc", "en": "Bcc"},
    "noname": {"ja": "（名前なし）", "en": "(no name)"},
    "nosubject": {"ja": "（件名なし）", "en": "(no subject)"},
    "reason": {
        "ja": "コメント（任意。送信者に伝えられます）",
        "en": "Comment (optional, sent to the sender)",
    },
    "btn.send": {"ja": "送信する", "en": "Send"},
    "btn.send_now": {"ja": "今すぐ送信する", "en": "Send now"},
    "btn.cancel": {"ja": "取り消す", "en": "Cancel"},
    "btn.approve": {"ja": "承認する", "en": "Approve"},
    "btn.refuse": {"ja": "却下する", "en": "Refuse"},
    "done.send": {
        "ja": "送信しました。メールは配送中です。",
        "en": "Sent. The message is on its way.",
    },
    "done.cancel": {
        "ja": "取り消しました。このメールは送信されません。",
        "en": "Cancelled. The message will not be sent.",
    },
    "done.approve": {
        "ja": "承認しました。メールは送信され、送信者に通知されます。",
        "en": "Approved. The message goes out and the sender is told.",
    },
    "done.refuse": {
        "ja": "却下しました。メールは送信されず、送信者に通知されます。",
        "en": "Refused. The message will not be sent and the sender is told.",
    },
    "gone.unknown": {
        "ja": "このリンクは無効です。URL が途中で切れていないか確認してください。",
        "en": "This link is not valid. Check that the address was not cut off.",
    },
    "gone.used": {
        "ja": "このリンクはすでに使われています。",
        "en": "This link has already been used.",
    },
    "gone.expired": {
        "ja": "このリンクは有効期限が切れています。",
        "en": "This link has expired.",
    },
    "gone.decided": {
        "ja": "このメールについてはすでに決定済みです（状態: {state}）。",
        "en": "This message has already been decided (state: {state}).",
    },
    "gone.limited": {
        "ja": "無効なリンクへのアクセスが多すぎます。しばらくしてからお試しください。",
        "en": "Too many invalid links from your address. Please try again later.",
    },
    "gone.stale": {
        "ja": "ページの有効時間が過ぎました。ページを開き直してからもう一度押してください。",
        "en": "This page is too old. Reload it and press the button again.",
    },
    "gone.forbidden": {
        "ja": "この操作は受け付けられません。ページを開き直してください。",
        "en": "This action was not accepted. Please reload the page.",
    },
    "state.held": {"ja": "保留中", "en": "held"},
    "state.released": {"ja": "送信済み（配送待ち）", "en": "released for delivery"},
    "state.delivering": {"ja": "配送中", "en": "being delivered"},
    "state.delivered": {"ja": "配送済み", "en": "delivered"},
    "state.cancelled": {"ja": "取り消し", "en": "cancelled"},
    "state.expired": {"ja": "期限切れ", "en": "expired"},
    "state.failed": {"ja": "配送失敗", "en": "failed"},
    "switch": {"ja": "English", "en": "日本語"},
    "footer": {
        "ja": "このページは MailGuard（メール誤送信防止）が表示しています。",
        "en": "This page is shown by MailGuard, the outgoing mail guard.",
    },
}


def pick_lang(request: web.Request, default: str) -> str:
    q = request.query.get("lang", "")
    if q in ("ja", "en"):
        return q
    best: tuple[float, str] | None = None
    for item in request.headers.get("Accept-Language", "").split(","):
        tag, _, params = item.strip().partition(";")
        m = re.search(r"q=([0-9.]+)", params)
        try:
            q_val = float(m[1]) if m else 1.0
        except ValueError:
            continue
        base = tag.strip().lower()[:2]
        if base in ("ja", "en") and (best is None or q_val > best[0]):
            best = (q_val, base)
    if best:
        return best[1]
    return "en" if default.startswith("en") else "ja"


class ClientAddress:
    """The client's address: the TCP peer, or the address a trusted proxy reports for it."""

    def __init__(self, trusted_proxies: Sequence[str] = (), header: str = "X-Forwarded-For"):
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in trusted_proxies)
        self.header = header

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr.strip().strip("[]"))
        except ValueError:
            return False
        return any(ip in n for n in self.trusted)

    def __call__(self, request: web.BaseRequest) -> str:
        peer = request.remote or "-"
        if not self.trusted or not self._is_trusted(peer):
            return peer  # a header from an untrusted peer is the client's own claim: ignored
        values = request.headers.getall(self.header, [])
        hops = [h.strip() for v in values for h in v.split(",") if h.strip()]
        for hop in reversed(hops):  # right-most first: the proxies' own additions
            try:
                ip = str(ipaddress.ip_address(hop.strip("[]")))
            except ValueError:
                return peer  # garbage where an address should be: do not trust the chain
            if not self._is_trusted(ip):
                return ip
        return peer


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp access log without tokens: /m/<token> is logged as /m/…"""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = redact_tokens(re.sub(r"^/m/[^/?]+", "/m/…", request.path))
        self.logger.info(
            '%s "%s %s" %s %.3fs', request.remote, request.method, path, response.status, time
        )


class _Web:
    def __init__(
        self,
        store: HeldStore,
        service: HoldService,
        secret: bytes,
        admin_token: str,
        lang_default: str,
        misses: Budget,
        upstream_check: Callable[[], Awaitable[bool]] | None,
        on_change: Callable[[], None] | None,
        min_dwell: float,
        timezone: tzinfo | None,
        public_url: str,
        metrics: Metrics | None = None,
        client_address: ClientAddress | None = None,
        logins: Budget | None = None,
    ) -> None:
        self.store = store
        self.client_ip = client_address or ClientAddress()
        # Both budgets are counted in the store: every process and node on it shares them.
        self.logins = logins or Budget("login", 10, 600.0, global_limit=100)
        u = yarl.URL(public_url) if public_url else None
        self.origins = (f"{u.scheme}://{u.raw_authority}",) if u and u.scheme else ()
        self.service = service
        self.secret = secret
        self.admin_token = admin_token
        self.lang_default = lang_default
        self.misses = misses
        self.upstream_check = upstream_check
        self.on_change = on_change
        self.min_dwell = min_dwell
        self.tz = timezone
        self.metrics = metrics
        self.jinja = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    # -- helpers -------------------------------------------------------------------------------

    def csrf(self, token: str, action: str, issued: int | None = None) -> str:
        """HMAC(token | action | issue time) with the issue time in milliseconds: min_dwell is
        measured from the moment the page was rendered, not from the start of its second."""
        issued = int(time.time() * 1000) if issued is None else issued
        mac = hmac.new(self.secret, f"{token}|{action}|{issued}".encode(), hashlib.sha256)
        return f"{issued}.{base64.urlsafe_b64encode(mac.digest()[:24]).decode()}"

    def csrf_ok(self, token: str, action: str, value: str) -> str:
        """ "" if fine, else "forbidden" or "stale"."""
        issued_s, _, _ = value.partition(".")
        if not issued_s.isdigit() or len(issued_s) > 16:
            return "forbidden"
        issued = int(issued_s)
        if not hmac.compare_digest(self.csrf(token, action, issued), value):
            return "forbidden"
        age = time.time() - issued / 1000.0
        if age > CSRF_MAX_AGE or age < -60:
            return "stale"
        if age < self.min_dwell:
            return "forbidden"  # submitted faster than a person reads: a scanner
        return ""

    def when(self, d: datetime) -> str:
        return d.astimezone(self.tz).strftime("%Y-%m-%d %H:%M %Z").strip()

    def render(self, name: str, lang: str, status: int = 200, /, **ctx: object) -> web.Response:
        def t(key: str, **kw: object) -> str:
            s = T[key][lang]
            return s.format(**kw) if kw else s

        body = self.jinja.get_template(name).render(lang=lang, t=t, **ctx)
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")

    def gone(self, lang: str, reason: str, held: Held | None = None) -> web.Response:
        status = {"unknown": 404, "limited": 429, "forbidden": 403, "stale": 400}.get(reason, 410)
        state = T[f"state.{held.state.value}"][lang] if held else ""
        resp = self.render("gone.html.j2", lang, status, reason=reason, state=state)
        if reason == "limited":
            resp.headers["Retry-After"] = str(int(self.misses.window))
        return resp

    # -- confirm pages -------------------------------------------------------------------------

    async def unknown(self, lang: str, ip: str) -> web.Response:
        """An unknown token: 404 and one miss counted (in the store, for every node), or 429
        once the client's or everyone's budget is used up."""
        if await self.store.rate_hit(self.misses, ip):
            return self.gone(lang, "limited")
        return self.gone(lang, "unknown")

    async def page(self, request: web.Request) -> web.StreamResponse:
        lang = pick_lang(request, self.lang_default)
        ip = self.client_ip(request)
        token = request.match_info["token"]
        try:
            view = await self.service.page(token)
        except TokenError as e:
            if e.reason == "unknown":
                return await self.unknown(lang, ip)
            return self.gone(lang, e.reason, e.held)
        held = view.held
        if view.token.role == "approver":
            mode = "approve"
        elif held.gate == "approve":
            mode = "pending"  # the sender's own link while an approver decides
        else:
            mode = held.gate  # "hold" or "confirm"
        hold_now = mode == "hold" and "send" in view.actions  # the policy allows "send now"
        lead = "lead.hold_now" if hold_now else f"lead.{mode}"
        ctx = self.page_context(held, lang, mode, lead)
        ctx["actions"] = view.actions
        ctx["csrf"] = {a: self.csrf(token, a) for a in view.actions}
        return self.render("page.html.j2", lang, **ctx)

    def page_context(self, held: Held, lang: str, mode: str, lead: str) -> dict[str, object]:
        """What the page shows about one kept message, from its stored Summary."""
        s = Summary.from_json(held.summary)
        raw_sender = s.sender or held.mail_from
        envelope_from = (
            data_text(held.mail_from, 320)
            if held.mail_from.lower() not in raw_sender.lower()
            else ""
        )
        sender = quoted(raw_sender, lang, 320)

        def person(r: Recipient) -> dict[str, str]:
            addr = data_text(r.addr, 320)
            return {
                "label": f"{quoted(r.name, lang, NAME_LIMIT)} <{addr}>" if r.name else addr,
                "field": T[f"field.{r.field}"][lang] if r.field != "to" else "",
            }

        groups = s.by_org()
        return {
            "mode": mode,
            "msg_id": held.id,  # the id in the SMTP reply, the log, the queue and the notices
            "lead": lead,
            "subject": quoted(s.subject, lang),
            "sender": sender,
            "envelope_from": envelope_from,
            "external": [(data_text(org, 255), [person(r) for r in rs]) for org, rs in groups],
            "external_count": len(s.external),
            "orgs": T["org"][lang] if len(groups) == 1 else T["orgs"][lang].format(n=len(groups)),
            "internal": [person(r) for r in s.internal],
            "findings": [data_text(f.text(lang), 400) for f in s.findings],
            "attachments": [
                {
                    "name": quoted(a.name, lang, NAME_LIMIT) or T["noname"][lang],
                    "size": human_size(a.size),
                    "content_type": data_text(a.content_type, 100),
                }
                for a in s.attachments
            ],
            "due": self.when(held.due),
            "timeout": "send" if held.on_timeout == "send" else "cancel",
            "other_lang": "en" if lang == "ja" else "ja",
        }

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.confirm_post(outcome)

    async def act(self, request: web.Request) -> web.StreamResponse:
        lang = pick_lang(request, self.lang_default)
        ip = self.client_ip(request)
        origin = request.headers.get("Origin")
        if origin not in (None, "null", *self.origins, f"{request.scheme}://{request.host}"):
            self._count("invalid")
            return self.gone(lang, "forbidden")  # a form on some other site posting here
        token = request.match_info["token"]
        form = await request.post()
        action = str(form.get("action", ""))
        lang = str(form.get("lang", "")) if form.get("lang") in ("ja", "en") else lang
        if action not in ACTION_OUTCOME:
            self._count("invalid")
            return self.gone(lang, "forbidden")
        bad = self.csrf_ok(token, action, str(form.get(f"csrf_{action}", "")))
        if bad:
            self._count("invalid")
            return self.gone(lang, bad)
        try:
            held = await self.service.act(
                token, action, reason=str(form.get("reason", "")), client=ip
            )
        except TokenError as e:
            if e.reason == "unknown":
                resp = await self.unknown(lang, ip)
                self._count("rate_limited" if resp.status == 429 else "invalid")
                return resp
            self._count(_token_outcome(e))
            return self.gone(lang, e.reason, e.held)
        except ValueError:
            self._count("invalid")
            return self.gone(lang, "forbidden")
        self._count(ACTION_OUTCOME[action])
        if self.metrics is not None:
            decided = held.updated or self.service.clock()
            self.metrics.human_decided(held.gate, (decided - held.created).total_seconds())
        if self.on_change is not None and action in ("send", "approve"):
            self.on_change()
        return self.render("done.html.j2", lang, action=action)

    # -- admin API -----------------------------------------------------------------------------

    # The login budget lives in the store. With the store unreachable the throttle fails open
    # (logged): /metrics behind the admin token must keep answering during a database outage,
    # and the token (≥ 32 characters) is not guessable within an outage anyway.
    async def _login_throttled(self, ip: str) -> bool:
        try:
            return await self.store.rate_blocked(self.logins, ip)
        except StoreError as e:
            log.warning("admin API: login throttle unavailable (store): %s", e)
            return False

    async def _login_failed(self, ip: str) -> None:
        try:
            await self.store.rate_hit(self.logins, ip)
        except StoreError as e:
            log.warning("admin API: failed login from %s not counted (store): %s", ip, e)

    async def _auth(self, request: web.Request) -> web.Response | None:
        if not self.admin_token:
            return web.json_response(
                {"error": "admin API disabled (no web.admin_token)"}, status=403
            )
        ip = self.client_ip(request)
        if await self._login_throttled(ip):  # refused before the token is even compared
            return web.json_response(
                {"error": "too many failed logins, try later"},
                status=429,
                headers={"Retry-After": str(int(self.logins.window))},
            )
        got = request.headers.get("Authorization", "")
        want = f"Bearer {self.admin_token}"
        if not hmac.compare_digest(got.encode(), want.encode()):
            await self._login_failed(ip)
            log.warning("admin API: failed login from %s", ip)
            return web.json_response(
                {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return None

    async def api_list(self, request: web.Request) -> web.StreamResponse:
        if (denied := await self._auth(request)) is not None:
            return denied
        q = request.query
        try:
            state = State(q["state"]) if q.get("state") else None
            since = datetime.fromisoformat(q["since"]) if q.get("since") else None
            limit = int(q.get("limit", "50"))
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        sender = q.get("sender") or None
        page = await self.store.list_messages(
            state=state, sender=sender, since=since, before=q.get("before") or None, limit=limit
        )
        total = await self.store.count(state, sender=sender, since=since)  # the same filters
        return web.json_response(
            {"items": [h.to_json() for h in page.items], "next": page.next, "total": total}
        )

    async def api_show(self, request: web.Request) -> web.StreamResponse:
        if (denied := await self._auth(request)) is not None:
            return denied
        msg_id = request.match_info["id"]
        held = await self.store.get(msg_id)
        if held is None:
            return web.json_response({"error": "no such message"}, status=404)
        notices = await self.store.notices_for(msg_id)
        return web.json_response(
            {
                "message": {
                    **held.to_json(),
                    "summary": dict(held.summary),
                    "decision": dict(held.decision),
                },
                "audit": [a.to_json() for a in await self.store.audit(msg_id)],
                "notices": [
                    {
                        "kind": n.kind,
                        "to": list(n.to),
                        "state": n.state,
                        "attempts": n.attempts,
                        "last_reply": n.last_reply,
                    }
                    for n in notices
                ],
            }
        )

    async def api_move(self, request: web.Request) -> web.StreamResponse:
        if (denied := await self._auth(request)) is not None:
            return denied
        msg_id, verb = request.match_info["id"], request.match_info["verb"]
        why = ""
        if request.can_read_body:
            try:
                body = await request.json()
                why = str(body.get("why", "")) if isinstance(body, Mapping) else ""
            except ValueError:
                return web.json_response({"error": "body must be JSON"}, status=400)
        by = f"api:{self.client_ip(request)}"
        try:
            if verb == "release":
                held = await self.service.release(msg_id, by=by, why=why or "released by admin")
                if self.on_change is not None:
                    self.on_change()
            else:
                held = await self.service.cancel(msg_id, by=by, why=why or "cancelled by admin")
        except TransitionError as e:
            status = 404 if e.current is None else 409
            return web.json_response({"error": str(e)}, status=status)
        return web.json_response(held.to_json())

    # the delivery history's state (None: not checked); set by make_app(history_check=…)
    history_check: Callable[[], bool | None] | None = None

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        store_ok = await self.store.ping()
        if self.metrics is not None:
            self.metrics.store_up.set(1 if store_ok else 0)
        up: bool | None = None
        if self.upstream_check is not None:
            try:
                up = bool(await self.upstream_check())
            except Exception:
                up = False
        history = self.history_check() if self.history_check is not None else None
        ok = store_ok and up is not False and history is not False
        return web.json_response(
            {"ok": ok, "store": store_ok, "upstream": up, "history": history},
            status=200 if ok else 503,
        )


# mailguard_confirm_posts_total{outcome}: what a POST that was carried out did
ACTION_OUTCOME = {
    "send": "released",
    "cancel": "cancelled",
    "approve": "approved",
    "refuse": "denied",
}


def _token_outcome(e: TokenError) -> str:
    """The confirm-post outcome of a token that could not act."""
    if e.reason == "unknown":
        return "invalid"
    if e.reason == "expired" or (
        e.reason == "decided" and e.held and e.held.state is State.EXPIRED
    ):
        return "expired"
    return "used"  # used, or the message was already decided through another link


def _metrics_route(
    metrics: Metrics, auth: Callable[[web.Request], Awaitable[web.Response | None]] | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /metrics; with `auth` (the admin API's Bearer check) only for the admin token."""

    async def render(request: web.Request) -> web.Response:
        if auth is not None and (denied := await auth(request)) is not None:
            return denied
        body, ctype = metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    return render


def make_metrics_app(metrics: Metrics) -> web.Application:
    """An application serving only GET /metrics (and /healthz-free): for `[metrics] listen`."""
    app = web.Application(middlewares=[security_headers])
    app.router.add_get("/metrics", _metrics_route(metrics))
    return app


WEB_KEY: web.AppKey[_Web] = web.AppKey("mailguard.web", _Web)


async def robots(request: web.Request) -> web.StreamResponse:
    return web.Response(text="User-agent: *\nDisallow: /\n")


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        resp = e
    except StoreError as e:  # the page must not leak internals; nothing changed either
        log.error("store unavailable for %s %s: %s", request.method, request.path[:3], e)
        resp = web.Response(
            status=503,
            text="MailGuard: temporarily unavailable, try again\n",
            headers={"Retry-After": "30"},
        )
    for k, v in SECURITY_HEADERS.items():
        resp.headers.setdefault(k, v)
    resp.headers["Server"] = SERVER_NAME
    if isinstance(resp, web.HTTPException):
        raise resp
    return resp


def make_app(
    store: HeldStore,
    service: HoldService,
    *,
    secret: bytes | str = b"",
    admin_token: str = "",
    public_url: str = "",
    lang_default: str = "ja",
    rate_limit: tuple[int, float] = (20, 600.0),
    upstream_check: Callable[[], Awaitable[bool]] | None = None,
    on_change: Callable[[], None] | None = None,
    min_dwell: float = 0.0,
    timezone: str = "Asia/Tokyo",
    metrics: Metrics | None = None,
    metrics_access: str = "open",
    global_miss_limit: int = 0,
    trusted_proxies: Sequence[str] = (),
    client_ip_header: str = "X-Forwarded-For",
    login_limit: tuple[int, int, float] = (10, 100, 600.0),
    history_check: Callable[[], bool | None] | None = None,
) -> web.Application:
    """The aiohttp application. `secret` "" = random per start (pages outlive no restart);
    `on_change` is called after a release (pass Scheduler.wake); `min_dwell` > 0 refuses a POST
    that follows its page faster than a person could read it; `metrics` counts page POSTs and
    observes the time to each person's decision.

    `rate_limit` (misses, window s) per client and `global_miss_limit` (all clients, 0 = none)
    bound unknown tokens; `login_limit` (per client, all clients, window s) bounds failed
    admin-API logins. `trusted_proxies` (CIDRs) are the peers whose `client_ip_header` names
    the client. `metrics_access`: "open" (GET /metrics for anyone who reaches the port),
    "token" (only with the admin Bearer token) or "off" (not on this app; see
    `make_metrics_app`). `history_check` tells /healthz whether the delivery history answers
    (its `history` field; None = not checked)."""
    if metrics_access not in METRICS_ACCESS:
        raise ValueError(f"metrics_access {metrics_access!r} (expected open, token or off)")
    from zoneinfo import ZoneInfo

    key = secret.encode() if isinstance(secret, str) else secret
    tz: tzinfo | None
    try:
        tz = ZoneInfo(timezone)
    except Exception:
        tz = None
    w = _Web(
        store,
        service,
        key or secrets.token_bytes(32),
        admin_token,
        lang_default,
        Budget("token", rate_limit[0], rate_limit[1], global_limit=global_miss_limit),
        upstream_check,
        on_change,
        min_dwell,
        tz,
        public_url,
        metrics,
        ClientAddress(trusted_proxies, client_ip_header),
        Budget("login", login_limit[0], login_limit[2], global_limit=login_limit[1]),
    )
    w.history_check = history_check  # /healthz: the delivery history reachable?
    app = web.Application(middlewares=[security_headers], client_max_size=64 * 1024)
    app[WEB_KEY] = w
    app.router.add_get(f"/m/{{token:{TOKEN_RE}}}", w.page)
    app.router.add_post(f"/m/{{token:{TOKEN_RE}}}", w.act)
    app.router.add_get("/api/messages", w.api_list)
    app.router.add_get("/api/messages/{id}", w.api_show)
    app.router.add_post("/api/messages/{id}/{verb:release|cancel}", w.api_move)
    app.router.add_get("/healthz", w.healthz)
    if metrics is not None and metrics_access != "off":
        app.router.add_get(
            "/metrics", _metrics_route(metrics, w._auth if metrics_access == "token" else None)
        )
    app.router.add_get("/robots.txt", robots)
    return app


def _hide_server_version() -> None:
    """aiohttp puts "Server: Python/3.x aiohttp/x.y" on every response it writes itself (a bad
    request line, a too-long header): say only "MailGuard" there too."""
    from aiohttp import web_response

    vars(web_response)["SERVER_SOFTWARE"] = SERVER_NAME  # read by StreamResponse at prepare


async def start_web(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve `app` with the token-redacting access log; returns the runner (await cleanup()).
    Also installs the token-redacting log filter on aiohttp's loggers (its error log quotes
    request lines) and hides aiohttp's version from the Server: header."""
    install_redaction()
    _hide_server_version()
    runner = web.AppRunner(
        app,
        access_log_class=RedactingAccessLogger,
        access_log=logging.getLogger("mailguard.web.access"),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
