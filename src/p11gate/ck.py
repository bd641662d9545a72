"""The PKCS#11 constants the gateway itself needs (values from pkcs11t.h)."""

from __future__ import annotations

# attributes
CKA_CLASS = 0x0
CKA_TOKEN = 0x1
CKA_PRIVATE = 0x2
CKA_LABEL = 0x3
CKA_UNIQUE_ID = 0x4
CKA_ID = 0x102

# object classes
CKO_DATA = 0
CKO_CERTIFICATE = 1
CKO_PUBLIC_KEY = 2
CKO_PRIVATE_KEY = 3
CKO_SECRET_KEY = 4

# users
CKU_SO = 0
CKU_USER = 1
CKU_CONTEXT_SPECIFIC = 2

# session states and flags
CKS_RO_PUBLIC_SESSION = 0
CKS_RO_USER_FUNCTIONS = 1
CKS_RW_PUBLIC_SESSION = 2
CKS_RW_USER_FUNCTIONS = 3
CKS_RW_SO_FUNCTIONS = 4
CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4

# slot flags
CKF_TOKEN_PRESENT = 0x1
CKF_REMOVABLE_DEVICE = 0x2

# token flags
CKF_WRITE_PROTECTED = 0x2
CKF_PROTECTED_AUTHENTICATION_PATH = 0x100

CKF_DONT_BLOCK = 0x1

# mechanisms whose raw parameter structure holds an object handle the gateway cannot
# translate: refused rather than forwarded with a client's virtual handle
CKM_X9_42_DH_HYBRID_DERIVE = 0x32
CKM_X9_42_MQV_DERIVE = 0x33
CKM_CONCATENATE_BASE_AND_KEY = 0x360
CKM_ECMQV_DERIVE = 0x1052
HANDLE_IN_RAW_PARAM = frozenset(
    {CKM_X9_42_DH_HYBRID_DERIVE, CKM_X9_42_MQV_DERIVE, CKM_CONCATENATE_BASE_AND_KEY,
     CKM_ECMQV_DERIVE}
)
