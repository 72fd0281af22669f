# OpenSSL 3 message digests (Debian libssl-dev, <openssl/evp.h>). Only what _codec uses.


cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD:
        pass

    ctypedef struct EVP_MD_CTX:
        pass

    ctypedef struct OSSL_LIB_CTX:
        pass

    ctypedef struct ENGINE:
        pass

    EVP_MD *EVP_MD_fetch(OSSL_LIB_CTX *ctx, const char *algorithm, const char *properties)
    const EVP_MD *EVP_sha256()

    EVP_MD_CTX *EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX *ctx)
    int EVP_DigestInit_ex(EVP_MD_CTX *ctx, const EVP_MD *type, ENGINE *impl)
    int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt)
    int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s)
    int EVP_Digest(const void *data, size_t count, unsigned char *md, unsigned int *size,
                   const EVP_MD *type, ENGINE *impl)
