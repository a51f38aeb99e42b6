"""What Daraja's identifiers and codes look like, and how wide each may be.

One constant per field, shared by the callback parser (which refuses anything wider or stranger)
and the database columns that hold the parsed value, so a value that passes the parser always
fits its column on every database.
"""

from __future__ import annotations

import re

# CheckoutRequestID and MerchantRequestID. Observed shapes: ``ws_CO_191220191020363925``,
# ``ws_CO_DMZ_264695293_11032019122104433``, ``29115-34620561-1``,
# ``2654-4b64-97ff-b827b542881d3130``. lipia's own payment ids (``pay_…``) share the rule.
MAX_ID_LENGTH = 80
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,80}")

# ResultCode: a number (``0``, ``1032``) or a word such as ``SFC_IC0003``. Written without
# leading zeros, signs or spaces: ``"0 "``, ``"00"`` or ``"0\u3000"`` are not success, and not any
# other code either.
MAX_RESULT_CODE_LENGTH = 40
RESULT_CODE_PATTERN = re.compile(r"0|[1-9][0-9]{0,9}|[A-Za-z][A-Za-z0-9_.\-]{0,39}")
MAX_RESULT_CODE_NUMBER = 10**10 - 1

MAX_RESULT_DESC_LENGTH = 400

# MpesaReceiptNumber: ten upper-case letters and digits in practice (``NLJ7RT61SV``). Receipts are
# case-insensitive identifiers, kept upper-case so that one receipt can never pay two orders by
# being written in two cases.
MAX_RECEIPT_LENGTH = 40
RECEIPT_PATTERN = re.compile(r"[A-Za-z0-9]{1,40}")

# TransactionDate (``20191219102115``) and PhoneNumber (``254708374149``) as their digits.
MAX_TRANSACTION_DATE_LENGTH = 20
MAX_PAYER_PHONE_LENGTH = 20
DIGITS_PATTERN = re.compile(r"[0-9]{1,20}")


def is_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None
