"""MailGuard: an outbound mail mis-send guard (メール誤送信防止ゲートウェイ) for Postfix."""

__version__ = "0.1.0"
