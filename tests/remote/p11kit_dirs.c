/* Test helper, LD_PRELOADed into pkcs11-tool: makes p11-kit read module files only from
 * $P11GATE_TEST_MODULE_DIR (instead of /usr/share/p11-kit/modules, /etc/pkcs11/modules),
 * so a test can use p11-kit-proxy.so with its own `remote: |p11gate tunnel …` module file
 * without touching the system, also as root (p11-kit ignores ~/.config/pkcs11 for root).
 * p11_kit_override_system_files() is exported by libp11-kit for exactly this (its own
 * and GnuTLS's test suites use it). */
#include <stddef.h>
#include <stdlib.h>

void p11_kit_override_system_files(const char *system_conf, const char *user_conf,
                                   const char *package_modules, const char *system_modules,
                                   const char *user_modules);

__attribute__((constructor)) static void p11gate_test_module_dir(void)
{
    const char *dir = getenv("P11GATE_TEST_MODULE_DIR");
    if (dir != NULL && dir[0] != '\0')
        p11_kit_override_system_files(NULL, NULL, dir, dir, dir);
}
