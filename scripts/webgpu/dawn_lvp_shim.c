/*
 * A Vulkan ICD that forwards every call to Mesa's lavapipe and changes one thing: for instances created by
 * Dawn (VkApplicationInfo.pEngineName == "Dawn"), the physical device reports SwiftShader's vendor/device ids
 * (0x1AE0 / 0xC0DE).
 *
 * Why: Chromium's GPU process only hands a CPU Vulkan adapter to WebGPU when it can import external images
 * (lavapipe cannot) or when it has SwiftShader's ids (CanUseAdapter in webgpu_decoder_impl.cc). lavapipe 25
 * has what SwiftShader lacks (shaderFloat16, subgroup size 8), so with the ids spoofed Chromium's WebGPU runs
 * f16 shaders on the CPU. Every other Vulkan user in the process (ANGLE with --use-angle=vulkan) sees the
 * real llvmpipe ids. The result is told apart from real SwiftShader by its features (shader-f16) and
 * subgroup sizes (8), which the test harness asserts.
 *
 * Built by scripts/webgpu/setup_lavapipe.sh: gcc -shared -fPIC -DLVP_LIBRARY="\"/abs/libvulkan_lvp.so\""
 * (the environment variable GRAPHKIT_LVP_LIBRARY overrides the path).
 */
#define VK_NO_PROTOTYPES
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vulkan.h>

#ifndef LVP_LIBRARY
#define LVP_LIBRARY "libvulkan_lvp.so"
#endif
#define EXPORT __attribute__((visibility("default")))
#define SWIFTSHADER_VENDOR 0x1AE0u
#define SWIFTSHADER_DEVICE 0xC0DEu
#define MAX_TRACKED 64

typedef PFN_vkVoidFunction (*PFN_icdGetProcAddr)(VkInstance, const char *);
typedef VkResult (*PFN_icdNegotiate)(uint32_t *);
typedef PFN_vkVoidFunction (*PFN_icdGetPhysProcAddr)(VkInstance, const char *);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static PFN_icdGetProcAddr real_gipa;
static PFN_icdNegotiate real_negotiate;
static PFN_icdGetPhysProcAddr real_gppa;

/* Dawn's instances and the physical devices enumerated from them (lavapipe's own handles). */
static VkInstance dawn_instances[MAX_TRACKED];
static VkPhysicalDevice dawn_devices[MAX_TRACKED];
static VkInstance dawn_device_owner[MAX_TRACKED];

static void load_lavapipe(void) {
  const char *path = getenv("GRAPHKIT_LVP_LIBRARY");
  if (!path || !*path) path = LVP_LIBRARY;
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    fprintf(stderr, "dawn_lvp_shim: cannot load lavapipe %s: %s\n", path, dlerror());
    return;
  }
  real_gipa = (PFN_icdGetProcAddr)dlsym(h, "vk_icdGetInstanceProcAddr");
  real_negotiate = (PFN_icdNegotiate)dlsym(h, "vk_icdNegotiateLoaderICDInterfaceVersion");
  real_gppa = (PFN_icdGetPhysProcAddr)dlsym(h, "vk_icdGetPhysicalDeviceProcAddr");
  if (!real_gipa) fprintf(stderr, "dawn_lvp_shim: %s has no vk_icdGetInstanceProcAddr\n", path);
}

static int is_dawn_instance(VkInstance inst) {
  for (int i = 0; i < MAX_TRACKED; ++i)
    if (dawn_instances[i] == inst) return 1;
  return 0;
}

static int is_dawn_device(VkPhysicalDevice dev) {
  int found = 0;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < MAX_TRACKED && !found; ++i)
    if (dawn_devices[i] == dev) found = 1;
  pthread_mutex_unlock(&lock);
  return found;
}

static PFN_vkCreateInstance real_create_instance;
static VkResult VKAPI_CALL shim_CreateInstance(const VkInstanceCreateInfo *ci, const VkAllocationCallbacks *alloc,
                                               VkInstance *out) {
  VkResult r = real_create_instance(ci, alloc, out);
  const VkApplicationInfo *app = ci ? ci->pApplicationInfo : NULL;
  if (r == VK_SUCCESS && app && app->pEngineName && strcmp(app->pEngineName, "Dawn") == 0) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_TRACKED; ++i)
      if (!dawn_instances[i]) { dawn_instances[i] = *out; break; }
    pthread_mutex_unlock(&lock);
  }
  return r;
}

static VkResult VKAPI_CALL shim_EnumeratePhysicalDevices(VkInstance inst, uint32_t *count, VkPhysicalDevice *devs) {
  PFN_vkEnumeratePhysicalDevices real = (PFN_vkEnumeratePhysicalDevices)real_gipa(inst, "vkEnumeratePhysicalDevices");
  VkResult r = real(inst, count, devs);
  if ((r == VK_SUCCESS || r == VK_INCOMPLETE) && devs) {
    pthread_mutex_lock(&lock);
    if (is_dawn_instance(inst)) {
      for (uint32_t k = 0; k < *count; ++k) {
        int known = 0;
        for (int i = 0; i < MAX_TRACKED; ++i) if (dawn_devices[i] == devs[k]) known = 1;
        for (int i = 0; i < MAX_TRACKED && !known; ++i)
          if (!dawn_devices[i]) { dawn_devices[i] = devs[k]; dawn_device_owner[i] = inst; break; }
      }
    }
    pthread_mutex_unlock(&lock);
  }
  return r;
}

static void VKAPI_CALL shim_DestroyInstance(VkInstance inst, const VkAllocationCallbacks *alloc) {
  PFN_vkDestroyInstance real = (PFN_vkDestroyInstance)real_gipa(inst, "vkDestroyInstance");
  pthread_mutex_lock(&lock);  /* forget the handles first: lavapipe may reuse the addresses */
  for (int i = 0; i < MAX_TRACKED; ++i) {
    if (dawn_instances[i] == inst) dawn_instances[i] = NULL;
    if (dawn_device_owner[i] == inst) { dawn_devices[i] = NULL; dawn_device_owner[i] = NULL; }
  }
  pthread_mutex_unlock(&lock);
  real(inst, alloc);
}

static PFN_vkGetPhysicalDeviceProperties real_props;
static void VKAPI_CALL shim_GetPhysicalDeviceProperties(VkPhysicalDevice dev, VkPhysicalDeviceProperties *p) {
  real_props(dev, p);
  if (is_dawn_device(dev)) { p->vendorID = SWIFTSHADER_VENDOR; p->deviceID = SWIFTSHADER_DEVICE; }
}

static PFN_vkGetPhysicalDeviceProperties2 real_props2;
static void VKAPI_CALL shim_GetPhysicalDeviceProperties2(VkPhysicalDevice dev, VkPhysicalDeviceProperties2 *p) {
  real_props2(dev, p);
  if (is_dawn_device(dev)) {
    p->properties.vendorID = SWIFTSHADER_VENDOR;
    p->properties.deviceID = SWIFTSHADER_DEVICE;
  }
}

/* The loader resolves every instance and physical-device function through here. */
static PFN_vkVoidFunction wrap(VkInstance inst, const char *name, PFN_vkVoidFunction real) {
  if (!real) return NULL;
  if (!strcmp(name, "vkCreateInstance")) { real_create_instance = (PFN_vkCreateInstance)real; return (PFN_vkVoidFunction)shim_CreateInstance; }
  if (!strcmp(name, "vkEnumeratePhysicalDevices")) return (PFN_vkVoidFunction)shim_EnumeratePhysicalDevices;
  if (!strcmp(name, "vkDestroyInstance")) return (PFN_vkVoidFunction)shim_DestroyInstance;
  if (!strcmp(name, "vkGetPhysicalDeviceProperties")) { real_props = (PFN_vkGetPhysicalDeviceProperties)real; return (PFN_vkVoidFunction)shim_GetPhysicalDeviceProperties; }
  if (!strcmp(name, "vkGetPhysicalDeviceProperties2") || !strcmp(name, "vkGetPhysicalDeviceProperties2KHR")) {
    real_props2 = (PFN_vkGetPhysicalDeviceProperties2)real;
    return (PFN_vkVoidFunction)shim_GetPhysicalDeviceProperties2;
  }
  (void)inst;
  return real;
}

EXPORT VkResult VKAPI_CALL vk_icdNegotiateLoaderICDInterfaceVersion(uint32_t *version) {
  pthread_once(&once, load_lavapipe);
  if (!real_negotiate) return VK_ERROR_INCOMPATIBLE_DRIVER;
  return real_negotiate(version);
}

EXPORT PFN_vkVoidFunction VKAPI_CALL vk_icdGetInstanceProcAddr(VkInstance inst, const char *name) {
  pthread_once(&once, load_lavapipe);
  if (!real_gipa || !name) return NULL;
  if (!strcmp(name, "vk_icdNegotiateLoaderICDInterfaceVersion")) return (PFN_vkVoidFunction)vk_icdNegotiateLoaderICDInterfaceVersion;
  if (!strcmp(name, "vk_icdGetInstanceProcAddr")) return (PFN_vkVoidFunction)vk_icdGetInstanceProcAddr;
  if (!strcmp(name, "vk_icdGetPhysicalDeviceProcAddr")) return real_gppa ? (PFN_vkVoidFunction)real_gppa : NULL;
  return wrap(inst, name, real_gipa(inst, name));
}

EXPORT PFN_vkVoidFunction VKAPI_CALL vk_icdGetPhysicalDeviceProcAddr(VkInstance inst, const char *name) {
  pthread_once(&once, load_lavapipe);
  if (!real_gppa || !name) return NULL;
  return wrap(inst, name, real_gppa(inst, name));
}
